"""A damaged store is refused, never replaced: every command answers one line and exit 2 saying how to recover,
and leaves the file as it was; a report never empties a night's page because the store is missing or new."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import child_env, ztfd_command
from ztfd import store

# Every command that reads or writes the store (the daemon's roles and the one-shot commands).
COMMANDS = [
    ("start", "--foreground"), ("consume", "--topic", "t"), ("fetch",), ("sync", "--once"),
    ("sync", "--once", "--full"), ("status",), ("status", "--json"),
    ("report", "--date", "2026-03-05"), ("report", "--watch"),
    ("replay", "--date", "2026-03-05"), ("rejected",), ("prune",), ("metrics",),
]


def a_store_with_rows(db: Path) -> None:
    conn = store.connect(db)
    with store.transaction(conn):
        store.record_files(conn, [(f"data/2026-03-05/t/ZTF18aaaaaaa_p0-o{i}.json", 100, "0" * 32)
                                  for i in range(3000)])
    conn.close()
    assert not Path(f"{db}-wal").exists()


def run_all(config_path: Path) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen(ztfd_command(config_path, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=child_env(ZTFD_LOG_CONSOLE="0")) for args in COMMANDS]
    done = []
    for args, proc in zip(COMMANDS, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return done


DAMAGES: dict[str, Callable[[Path], None]] = {
    "empty (0 bytes)": lambda db: db.write_bytes(b""),
    "truncated": lambda db: (a_store_with_rows(db), db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])),
    "not a SQLite database": lambda db: db.write_bytes(b"\x00garbage" * 4096),
    "unreadable": lambda db: (a_store_with_rows(db), _overwrite(db, 100, b"\xa5" * 3900)),
}


def _overwrite(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(at)
        handle.write(data)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_command_refuses_a_damaged_store_in_a_home_with_an_archive(
    damage: str, make_config: Callable[..., Path]
) -> None:
    config_path = make_config(s3={"bucket": "b", "endpoint_url": "http://127.0.0.1:1"},
                              metrics={"listen": "127.0.0.1:1"}, stamps={"enabled": True})
    home = config_path.parent
    (home / "data" / "2026-03-05" / "t").mkdir(parents=True)
    (home / "data" / "2026-03-05" / "t" / "ZTF18aaaaaaa_p0-o0.json").write_text("{}")
    db = home / "state" / "ztfd.sqlite3"
    db.parent.mkdir(parents=True, exist_ok=True)
    DAMAGES[damage](db)
    before = db.read_bytes()
    for result in run_all(config_path):
        assert result.returncode == 2, (result.args, result.returncode, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, (result.args, result.stderr)
        assert damage in lines[0] and "holds an archive" in lines[0], lines[0]
        assert f"mv {db} {db}.damaged" in lines[0] and "ztfd sync --once --full" in lines[0]
        assert result.stdout == "", (result.args, result.stdout)
    assert db.read_bytes() == before, "the damaged store is left as it was"
    assert not (home / "state" / "ztfd.pid").exists()


def test_an_empty_store_file_in_a_new_home_is_a_store_being_created(make_config: Callable[..., Path]) -> None:
    config_path = make_config()
    db = config_path.parent / "state" / "ztfd.sqlite3"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"")
    status = subprocess.run(ztfd_command(config_path, "status"), capture_output=True, text=True, env=child_env(),
                            timeout=60)
    assert status.returncode == 3, status.stderr  # not running: LSB's 3, not a refusal
    pruned = subprocess.run(ztfd_command(config_path, "prune"), capture_output=True, text=True, env=child_env(),
                            timeout=60)
    assert pruned.returncode == 0, pruned.stderr
    assert store.db.schema_version(store.connect(db)) == store.db.SCHEMA_VERSION


def test_a_report_never_empties_a_night_page_because_the_store_is_missing_or_new(
    make_config: Callable[..., Path]
) -> None:
    config_path = make_config()
    home = config_path.parent
    page = home / "reports" / "2026-03-05" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html>120 objects</html>")
    report = ztfd_command(config_path, "report", "--date", "2026-03-05")
    missing = subprocess.run(report, capture_output=True, text=True, env=child_env(), timeout=60)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "is missing" in missing.stderr and "holds an archive" in missing.stderr
    assert not (home / "state" / "ztfd.sqlite3").exists()
    store.connect(home / "state" / "ztfd.sqlite3").close()  # a new store, as after moving a damaged one aside
    new = subprocess.run(report, capture_output=True, text=True, env=child_env(), timeout=60)
    assert new.returncode == 2 and "no alerts on 2026-03-05" in new.stderr, new.stderr
    assert page.read_text() == "<html>120 objects</html>"
