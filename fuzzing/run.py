"""One fuzz target under atheris (libFuzzer): ``python -m fuzzing.run <target> <findings dir> [libFuzzer args]``.

An input that makes the target raise what its decoder does not promise is a *finding*: kept in the findings
folder (``<target>-finding-<n>.bin`` and its traceback), once per place it was raised from, and fuzzing goes on.
A crash, a hang past ``-timeout`` or memory past ``-rss_limit_mb`` ends the run; libFuzzer keeps that input
(``-artifact_prefix``)."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from fuzzing.targets import TARGETS


def recording(name: str, callback, findings: Path):
    """``callback`` that keeps what it raises instead of ending the run."""
    seen: set[tuple[str, str]] = set()

    def one_input(data: bytes) -> None:
        try:
            callback(data)
        except Exception as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            where = next((f"{f.filename}:{f.lineno}" for f in reversed(frames) if "/ztfd/" in f.filename), "?")
            if (type(exc).__name__, where) in seen:
                return
            seen.add((type(exc).__name__, where))
            stem = findings / f"{name}-finding-{len(seen)}"
            stem.with_suffix(".bin").write_bytes(data)
            stem.with_suffix(".txt").write_text("".join(traceback.format_exception(exc)))

    return one_input


def main() -> None:
    import atheris

    name, findings = sys.argv[1], Path(sys.argv[2])
    findings.mkdir(parents=True, exist_ok=True)
    callback = TARGETS[name].make()
    atheris.instrument_all()  # coverage of every Python function loaded: ztfd's decoders, json, zlib's callers
    atheris.Setup([sys.argv[0], *sys.argv[3:]], recording(name, callback, findings))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
