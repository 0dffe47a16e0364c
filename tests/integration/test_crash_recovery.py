"""Crash recovery: SIGKILL the whole server while storescu streams objects into it.

After the crash the archive must start again, repair what the dead processes left, keep
every object it acknowledged, and agree with itself: every index row has its blob with the
recorded SHA-256, every blob has a row, and no staged file of a dead process remains.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import (
    StockadeServer,
    assert_index_matches_storage,
    assert_verify_intact,
    clean_env,
    require_dcmtk,
    store_responses,
    storescu,
    storescu_args,
    write_ct_series,
)

pytestmark = pytest.mark.dcmtk

MakeServer = Callable[..., StockadeServer]
COUNT = 300
#: Kill once at least this many instances are in the index.
KILL_AFTER = 50


@pytest.fixture(scope="session")
def crash_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """300 CT objects of 512 x 512 x 16 bit (about 512 KiB each), written once."""
    folder = tmp_path_factory.mktemp("crash") / "ct"
    return write_ct_series(folder, COUNT, size=512, seed=7, patient_id="CRASH", series_count=3)


def _run_storescu_until_killed(
    server: StockadeServer, files: list[Path], logs: Path
) -> tuple[int, list[str]]:
    """Two concurrent storescu runs over *files*; SIGKILL the server group mid-transfer.

    Returns the instance count seen just before the kill and the storescu outputs.
    """
    halves = [files[0::2], files[1::2]]
    handles = [(logs / f"storescu{i}.log").open("w+") for i in range(len(halves))]
    procs = [
        subprocess.Popen(
            storescu_args(server.port, half),
            env=clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for half, log in zip(halves, handles, strict=True)
    ]
    try:
        seen = server.wait_for_count(
            KILL_AFTER, timeout=60, alive=lambda: all(p.poll() is None for p in procs)
        )
        running = all(p.poll() is None for p in procs)
        server.kill()
        for proc in procs:
            proc.wait(60)  # storescu fails on the dead connection; that is expected
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for log in handles:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert running and seen >= KILL_AFTER, (
        f"storescu ended or stalled before {KILL_AFTER} instances were indexed (saw {seen})\n"
        + "\n".join(o[-1500:] for o in outputs)
        + server.log_tail()
    )
    return seen, outputs


@pytest.mark.parametrize("workers", [1, 2], ids=["1worker", "2workers"])
def test_sigkill_while_storing_then_recover(
    make_server: MakeServer,
    db_url: str,
    crash_corpus: dict[str, Path],
    workers: int,
    tmp_path: Path,
) -> None:
    require_dcmtk("storescu", "echoscu")
    uid_of = {str(path): uid for uid, path in crash_corpus.items()}
    files = sorted(crash_corpus.values())
    server = make_server(db_url, workers=workers)
    server.start()

    seen, outputs = _run_storescu_until_killed(server, files, tmp_path)
    acknowledged = {
        uid_of[f]
        for out in outputs
        for f, status in store_responses(out).items()
        if status == "Success"
    }
    assert len(acknowledged) < COUNT, "the kill came after everything was stored"

    server.start()  # recovery runs before the listener opens
    count = server.count()
    assert count >= seen
    assert_verify_intact(server, count)
    rows = assert_index_matches_storage(server)
    indexed = {r.sop_uid for r in rows}
    lost = acknowledged - indexed
    assert not lost, f"{len(lost)} acknowledged instances are gone after the crash"
    assert indexed <= set(crash_corpus)
    assert server.staging_tmp_files() == [], "staged files of dead processes were left"
    live = server.group_pids()
    areas = sorted((server.data_dir / "staging").iterdir())
    stale = [a.name for a in areas if int(a.name.split("-", 1)[0]) not in live]
    assert not stale, f"staging areas of dead processes remain: {stale}"

    result = storescu(server.port, files, timeout=240)
    responses = store_responses(result.stdout)
    assert len(responses) == COUNT and set(responses.values()) == {"Success"}, result.stdout[-3000:]
    rows = assert_index_matches_storage(server)
    assert {r.sop_uid for r in rows} == set(crash_corpus)
    assert_verify_intact(server, COUNT)
    assert server.staging_tmp_files() == []
    assert server.stop() == 0
