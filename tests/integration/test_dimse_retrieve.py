"""C-GET and C-MOVE against DCMTK getscu, movescu and storescp, and ``stockade send``.

One archive per database holds an uncompressed CT study (two series), studies stored
compressed (RLE, JPEG 2000 lossless, JPEG lossless) and a study kept for the corruption
test. Received files are compared with what was stored: pixel data byte-identical when
the receiver accepted the stored transfer syntax, equal decoded pixels when Stockade had
to transcode.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import database

from .conftest import (
    AE_TITLE,
    DCMTK_TIMEOUTS,
    HOST,
    StockadeServer,
    clean_env,
    free_port,
    message_pdus,
    raw_associate,
    recv_pdu,
    require_dcmtk,
    write_ct_series,
)
from .fill import add_nodes, store_files

pytestmark = pytest.mark.dcmtk
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
#: pydicom test files stored compressed, one study each (name -> stored transfer syntax)
COMPRESSED = {
    "SC_rgb_rle.dcm": RLE,
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "1.2.840.10008.1.2.4.70",
}


@dataclass
class Holdings:
    """What the archive was given: file paths per study, and the corruption study."""

    ct_study: str
    ct_series: list[str]
    ct_files: dict[str, Path]  # SOP Instance UID -> original file
    compressed: dict[str, Path] = field(default_factory=dict)  # study UID -> original file
    spare_study: str = ""
    spare_files: dict[str, Path] = field(default_factory=dict)


@dataclass
class Rig:
    server: StockadeServer
    held: Holdings
    dest_ports: dict[str, int]
    root: Path


DESTINATIONS = ("DESTEXPL", "DESTIMPL", "DESTRLE", "DESTALL")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_dcmtk("getscu", "movescu", "storescp")
    root = tmp_path_factory.mktemp(f"retrieve-{request.param}")
    with database(request.param, root) as url:
        server = StockadeServer(root, db_url=url)
        ct = write_ct_series(root / "src-ct", 6, series_count=2, patient_id="RET-1")
        spare = write_ct_series(root / "src-spare", 3, seed=7, patient_id="RET-2")
        held = Holdings(
            ct_study=str(pydicom.dcmread(next(iter(ct.values()))).StudyInstanceUID),
            ct_series=sorted({str(pydicom.dcmread(p).SeriesInstanceUID) for p in ct.values()}),
            ct_files=ct,
            spare_study=str(pydicom.dcmread(next(iter(spare.values()))).StudyInstanceUID),
            spare_files=spare,
        )
        paths = [*ct.values(), *spare.values()]
        for name in COMPRESSED:
            path = Path(str(get_testdata_file(name)))
            held.compressed[str(pydicom.dcmread(path).StudyInstanceUID)] = path
            paths.append(path)
        store_files(server, paths)
        ports = {ae: free_port() for ae in DESTINATIONS}
        nodes = [
            ("getscu", "GETSCU", 104, "echo,find,get"),
            ("movescu", "MOVESCU", 104, "echo,find,move"),
            ("findonly", "FINDONLY", 104, "echo,find"),
            ("echoscu", "ECHOSCU", 104, "echo"),
            *((ae.lower(), ae, port, "echo") for ae, port in ports.items()),
        ]
        add_nodes(server, *nodes)
        server.start()
        try:
            yield Rig(server, held, ports, root)
        finally:
            if server.proc is not None:
                server.stop()
            server.assert_no_secret_written()


@contextlib.contextmanager
def storescp(rig: Rig, ae: str, out: Path, *options: str) -> Iterator[Path]:
    """A DCMTK storescp for destination *ae* writing into *out* (stopped afterwards)."""
    out.mkdir(parents=True, exist_ok=True)
    port = rig.dest_ports[ae]
    log = (out.parent / f"{out.name}.storescp.log").open("w")
    proc = subprocess.Popen(
        [
            "storescp",
            "-v",
            "-aet",
            ae,
            "-od",
            str(out),
            "-ta",
            "10",
            "-td",
            "60",
            *options,
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=clean_env(),
    )
    try:
        # readiness: echoscu answers (bounded poll)
        for _ in range(200):
            ping = subprocess.run(
                ["echoscu", "-aec", ae, HOST, str(port)],
                capture_output=True,
                env=clean_env(),
                timeout=10,
                check=False,
            )
            if ping.returncode == 0:
                break
            assert proc.poll() is None, "storescp exited"
            subprocess.run(["sleep", "0.05"], check=False)
        yield out
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=clean_env(),
        timeout=timeout,
        check=False,
    )


def getscu(rig: Rig, out: Path, *keys: str, extra: tuple[str, ...] = ()) -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-d", "-S", "-aet", "GETSCU", "-aec", AE_TITLE, *DCMTK_TIMEOUTS]
    args += ["-od", str(out), *extra]
    for key in keys:
        args += ["-k", key]
    return run([*args, HOST, str(rig.server.port)]).stdout


def movescu(rig: Rig, destination: str, *keys: str, extra: tuple[str, ...] = ()) -> str:
    args = ["movescu", "-d", "-S", "-aet", "MOVESCU", "-aec", AE_TITLE, "-aem", destination]
    args += [*DCMTK_TIMEOUTS, *extra]
    for key in keys:
        args += ["-k", key]
    return run([*args, HOST, str(rig.server.port)]).stdout


_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")


def final_status(output: str) -> int:
    """The last DIMSE status in a DCMTK tool's debug output."""
    found = _STATUS.findall(output)
    assert found, output[-2000:]
    return int(found[-1], 16)


def received(folder: Path) -> dict[str, pydicom.Dataset]:
    """Every DICOM file in *folder* by SOP Instance UID."""
    out = {}
    for path in folder.iterdir():
        if path.is_file() and not path.name.endswith(".log"):
            ds = pydicom.dcmread(path)
            out[str(ds.SOPInstanceUID)] = ds
    return out


def pixels(ds: pydicom.Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(ds.pixel_array)


def retrieved_events(rig: Rig) -> list[dict[str, object]]:
    return [
        e
        for e in rig.server.audit()
        if e["type"] == "InstancesRetrieved" and e["service"] != "cache"
    ]


# -- C-GET ------------------------------------------------------------------------------------


def test_getscu_retrieves_a_whole_study_then_one_series(rig: Rig, tmp_path: Path) -> None:
    held = rig.held
    output = getscu(
        rig, tmp_path / "study", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={held.ct_study}"
    )
    assert final_status(output) == 0x0000, output[-3000:]
    got = received(tmp_path / "study")
    assert set(got) == set(held.ct_files)
    for uid, path in held.ct_files.items():
        original = pydicom.dcmread(path)
        assert got[uid].file_meta.TransferSyntaxUID == EXPLICIT
        assert got[uid].PixelData == original.PixelData
        assert got[uid].PatientID == original.PatientID

    series = held.ct_series[0]
    output = getscu(
        rig,
        tmp_path / "series",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={held.ct_study}",
        f"SeriesInstanceUID={series}",
    )
    assert final_status(output) == 0x0000
    got = received(tmp_path / "series")
    expected = {
        uid for uid, p in held.ct_files.items() if pydicom.dcmread(p).SeriesInstanceUID == series
    }
    assert set(got) == expected and len(expected) == 3
    event = retrieved_events(rig)[-1]
    assert event["service"] == "get" and event["completed"] == 3 and event["failed"] == 0
    assert event["study_uids"] == [held.ct_study] and event["actor"]["ae_title"] == "GETSCU"


def test_getscu_accepting_implicit_only_gets_decompressed_pixels(rig: Rig, tmp_path: Path) -> None:
    """Stored RLE, JPEG 2000 and JPEG lossless instances reach an Implicit VR Little Endian
    only receiver decompressed, with exactly the pixels the stored codestream decodes to."""
    for number, (study, path) in enumerate(rig.held.compressed.items()):
        out = tmp_path / f"s{number}"
        output = getscu(rig, out, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        assert final_status(output) == 0x0000, output[-3000:]
        got = list(received(out).values())
        assert len(got) == 1
        original = pydicom.dcmread(path)
        assert got[0].file_meta.TransferSyntaxUID == EXPLICIT
        assert np.array_equal(pixels(got[0]), pixels(original)), path.name
        assert got[0].SOPInstanceUID == original.SOPInstanceUID


def test_a_peer_without_get_permission_is_refused(rig: Rig, tmp_path: Path) -> None:
    args = [
        "getscu",
        "-d",
        "-S",
        "-aet",
        "FINDONLY",
        "-aec",
        AE_TITLE,
        *DCMTK_TIMEOUTS,
        "-od",
        str(tmp_path),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={rig.held.ct_study}",
        HOST,
        str(rig.server.port),
    ]
    output = run(args).stdout
    assert final_status(output) == 0x0124
    assert not any(tmp_path.iterdir())


# -- C-MOVE ------------------------------------------------------------------------------------


def test_movescu_to_storescp_study_and_series(rig: Rig, tmp_path: Path) -> None:
    held = rig.held
    with storescp(rig, "DESTEXPL", tmp_path / "study"):
        output = movescu(
            rig, "DESTEXPL", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={held.ct_study}"
        )
    assert final_status(output) == 0x0000, output[-3000:]
    assert output.count("Received Move Response") == 6 or "Pending" in output
    got = received(tmp_path / "study")
    assert set(got) == set(held.ct_files)
    for uid, path in held.ct_files.items():
        assert got[uid].PixelData == pydicom.dcmread(path).PixelData
    event = retrieved_events(rig)[-1]
    assert event["service"] == "move" and event["destination"] == "DESTEXPL"
    assert event["completed"] == 6

    series = held.ct_series[1]
    with storescp(rig, "DESTEXPL", tmp_path / "series"):
        output = movescu(
            rig,
            "DESTEXPL",
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={held.ct_study}",
            f"SeriesInstanceUID={series}",
        )
    assert final_status(output) == 0x0000
    got = received(tmp_path / "series")
    assert len(got) == 3
    assert {str(d.SeriesInstanceUID) for d in got.values()} == {series}


def test_compressed_instances_go_as_stored_when_accepted(rig: Rig, tmp_path: Path) -> None:
    with storescp(rig, "DESTALL", tmp_path / "all", "+xa"):
        for study in rig.held.compressed:
            output = movescu(
                rig, "DESTALL", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"
            )
            assert final_status(output) == 0x0000, output[-3000:]
    got = received(tmp_path / "all")
    assert len(got) == len(rig.held.compressed)
    for path in rig.held.compressed.values():
        original = pydicom.dcmread(path)
        copy = got[str(original.SOPInstanceUID)]
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert copy.PixelData == original.PixelData  # the same codestream, byte for byte


def test_implicit_only_destination_gets_transcoded_instances(rig: Rig, tmp_path: Path) -> None:
    with storescp(rig, "DESTIMPL", tmp_path / "impl", "+xi"):
        for study in rig.held.compressed:
            output = movescu(
                rig, "DESTIMPL", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"
            )
            assert final_status(output) == 0x0000, output[-3000:]
    got = received(tmp_path / "impl")
    for path in rig.held.compressed.values():
        original = pydicom.dcmread(path)
        copy = got[str(original.SOPInstanceUID)]
        assert copy.file_meta.TransferSyntaxUID == IMPLICIT
        assert np.array_equal(pixels(copy), pixels(original)), path.name


RLE_ONLY_CONFIG = """\
[[TransferSyntaxes]]
[RLEOnly]
TransferSyntax1 = RLELossless
[Uncompressed]
TransferSyntax1 = LittleEndianImplicit
[[PresentationContexts]]
[RLEContexts]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\RLEOnly
[[Profiles]]
[RLE]
PresentationContexts = RLEContexts
"""


def test_an_rle_only_destination_gets_losslessly_compressed_instances(
    rig: Rig, tmp_path: Path
) -> None:
    config = tmp_path / "rle.cfg"
    config.write_text(RLE_ONLY_CONFIG)
    held = rig.held
    with storescp(rig, "DESTRLE", tmp_path / "rle", "-xf", str(config), "RLE"):
        output = movescu(
            rig, "DESTRLE", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={held.ct_study}"
        )
    assert final_status(output) == 0x0000, output[-3000:]
    got = received(tmp_path / "rle")
    assert set(got) == set(held.ct_files)
    for uid, path in held.ct_files.items():
        assert got[uid].file_meta.TransferSyntaxUID == RLE
        assert np.array_equal(pixels(got[uid]), pixels(pydicom.dcmread(path)))


def test_unknown_move_destination_is_refused_with_a801(rig: Rig) -> None:
    output = movescu(
        rig, "NOBODY", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={rig.held.ct_study}"
    )
    assert final_status(output) == 0xA801
    assert "not a configured node" in output


def test_move_to_a_destination_that_is_down_fails_with_a702(rig: Rig) -> None:
    """DESTIMPL is a configured node, but nothing listens on its port right now."""
    output = movescu(
        rig, "DESTIMPL", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={rig.held.ct_study}"
    )
    assert final_status(output) == 0xA702
    assert "cannot connect" in output
    event = retrieved_events(rig)[-1]
    assert (event["service"], event["failed"], event["completed"]) == ("move", 6, 0)
    assert echoscu_ok(rig)


def echoscu_ok(rig: Rig) -> bool:
    """The archive still answers C-ECHO."""
    return run(["echoscu", "-aec", AE_TITLE, HOST, str(rig.server.port)]).returncode == 0


def test_cancel_before_the_first_suboperation(rig: Rig, tmp_path: Path) -> None:
    """A C-CANCEL-RQ that arrives with the C-MOVE-RQ stops it before any instance is sent:
    final status FE00H with every sub-operation still remaining."""
    from io import BytesIO

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dimse_messages import C_CANCEL_RQ, C_MOVE_RQ
    from pynetdicom.dimse_primitives import C_CANCEL, C_MOVE

    ds = pydicom.Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = rig.held.ct_study
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)

    move = C_MOVE()
    move.MessageID = 7
    move.AffectedSOPClassUID = STUDY_ROOT_MOVE
    move.Priority = 2
    move.MoveDestination = "DESTEXPL"
    move.Identifier = BytesIO(buf.getvalue())
    move_message = C_MOVE_RQ()
    move_message.primitive_to_message(move)
    cancel = C_CANCEL()
    cancel.MessageIDBeingRespondedTo = 7
    cancel_message = C_CANCEL_RQ()
    cancel_message.primitive_to_message(cancel)

    with storescp(rig, "DESTEXPL", tmp_path / "out"):
        sock = raw_associate(rig.server.port, STUDY_ROOT_MOVE, IMPLICIT, "MOVESCU")
        sock.sendall(message_pdus(move_message) + message_pdus(cancel_message))
        pdu_type, body = recv_pdu(sock)
        assert pdu_type == 0x04 and body[5] == 0x03
        response = pydicom.dcmread(BytesIO(body[6:]), force=True)
        sock.close()
    assert int(response.Status) == 0xFE00
    assert int(response.NumberOfRemainingSuboperations) == 6
    assert int(response.NumberOfCompletedSuboperations) == 0
    assert not any((tmp_path / "out").iterdir())


# -- stockade send ----------------------------------------------------------------------------


def test_stockade_send_a_study_to_a_node(rig: Rig, tmp_path: Path) -> None:
    with storescp(rig, "DESTEXPL", tmp_path / "sent"):
        done = rig.server.cli("send", "destexpl", "--study", rig.held.ct_study)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sent 6, warning 0, failed 0" in done.stdout
    got = received(tmp_path / "sent")
    assert set(got) == set(rig.held.ct_files)
    event = retrieved_events(rig)[-1]
    assert event["service"] == "send" and event["actor"]["via"] == "cli"


def test_send_to_an_absent_node_fails_cleanly(rig: Rig) -> None:
    done = rig.server.cli("send", "destexpl", "--study", rig.held.ct_study)  # nobody listening
    assert done.returncode == 1
    assert "failed 6" in done.stdout and "cannot connect" in done.stderr


# -- integrity ---------------------------------------------------------------------------------


def test_a_corrupted_instance_is_not_sent_and_is_reported(rig: Rig, tmp_path: Path) -> None:
    """One flipped byte in a stored blob: that instance is not sent (failed, final B000H),
    the others are, and a Security Alert names it. It damages (and then restores) a blob
    of the spare study, which no other test uses."""
    held = rig.held
    victim = next(iter(held.spare_files))
    rows = {r.sop_uid: r.blob_key for r in rig.server.rows()}
    blob = rig.server.data_dir / "blobs" / rows[victim]
    saved = tmp_path / "saved.blob"
    shutil.copy2(blob, saved)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.chmod(0o600)
    blob.write_bytes(bytes(data))
    try:
        output = getscu(
            rig,
            tmp_path / "got",
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={held.spare_study}",
        )
    finally:
        shutil.copy2(saved, blob)
    assert final_status(output) == 0xB000, output[-3000:]
    got = received(tmp_path / "got")
    assert set(got) == set(held.spare_files) - {victim}
    alerts = [
        e
        for e in rig.server.audit()
        if e["type"] == "SecurityAlert" and e["finding"] == "integrity"
    ]
    assert alerts and alerts[-1]["sop_instance_uid"] == victim
    event = retrieved_events(rig)[-1]
    assert event["failed"] == 1 and event["completed"] == 2 and event["outcome"] == "failure"
    assert victim in str(event["reason"])
    assert json.dumps(event)  # a plain record
