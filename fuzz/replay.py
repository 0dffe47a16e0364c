"""Replay corpora through a fuzz target without libFuzzer and report line coverage.

::

    .venv/bin/python fuzz/replay.py ingest fuzz/work/corpus-ingest fuzz/corpus/ingest

Every file of the given folders goes through the target's input function once (an
exception stops the replay with its traceback, as a crash would). Lines are recorded with
the standard library's tracing hook for the modules of Stockade the target is about, and the
share of each module's function lines that ran is printed: what the corpus reaches, and
what no input has reached yet (``--missing`` lists those lines).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src" / "stockade"
MODULES = {
    "ingest": ["dicom/parse.py", "dicom/part10.py", "dicom/attributes.py", "ingest.py"],
    "multipart": ["web/multipart.py"],
}
# Optional modules the ingest pipeline may call (reported when present).
OPTIONAL = {"ingest": ["dicom/examine.py", "dicom/inspect.py"]}


def function_lines(path: Path) -> set[int]:
    """Lines of *path* that belong to a function body (module and class bodies run at import)."""
    code = compile(path.read_text(encoding="utf-8"), str(path), "exec")
    lines: set[int] = set()

    def walk(obj: types.CodeType, inside: bool) -> None:
        is_function = bool(obj.co_flags & 0x1)  # CO_OPTIMIZED: functions, not bodies
        if inside or is_function:
            lines.update(line for _s, _e, line in obj.co_lines() if line is not None)
        for const in obj.co_consts:
            if isinstance(const, types.CodeType):
                walk(const, inside or is_function)

    walk(code, False)
    return lines


def load_target(name: str) -> Callable[[bytes], None]:
    """Import ``fuzz/<name>_target.py`` (Stockade imported first: not instrumented)."""
    import stockade.archive
    import stockade.web.multipart  # noqa: F401

    spec = importlib.util.spec_from_file_location(f"{name}_target", HERE / f"{name}_target.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"no target {name}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function: Callable[[bytes], None] = module.input_function()
    return function


def inputs(folders: list[Path]) -> Iterator[Path]:
    """Every file of *folders*, sorted within each."""
    for folder in folders:
        yield from sorted(p for p in folder.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """Replay and print the coverage table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("target", choices=sorted(MODULES))
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--missing", action="store_true", help="list lines never reached")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stockade-replay-") as scratch:
        os.environ["STOCKADE_FUZZ_WORKDIR"] = scratch
        return replay(args.target, args.folders, missing=args.missing)


def replay(target: str, folders: list[Path], *, missing: bool) -> int:
    """Replay *folders* through *target* and print the table."""
    run = load_target(target)
    files = [SRC / m for m in MODULES[target]]
    files += [SRC / m for m in OPTIONAL.get(target, []) if (SRC / m).exists()]
    watched = {str(f) for f in files}
    seen: dict[str, set[int]] = {name: set() for name in watched}

    def tracer(frame: types.FrameType, event: str, _arg: Any) -> Any:
        filename = frame.f_code.co_filename
        if filename not in watched:
            return None
        seen[filename].add(frame.f_lineno)
        return tracer

    count = 0
    threading.settrace(tracer)
    sys.settrace(tracer)
    try:
        for path in inputs(folders):
            run(path.read_bytes())
            count += 1
    finally:
        sys.settrace(None)
        threading.settrace(None)
    print(f"{count} inputs replayed through the {target} target")
    for path in files:
        lines = function_lines(path)
        hit = seen[str(path)] & lines
        share = 100 * len(hit) / max(len(lines), 1)
        print(
            f"{path.relative_to(SRC.parent.parent)}: {len(hit)}/{len(lines)} lines ({share:.0f}%)"
        )
        if missing:
            print("  never reached:", ", ".join(str(n) for n in sorted(lines - hit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
