"""What a running consumer heard of its partitions' ends, kept for ``ztfd status`` (``ztfd.ingest.seen_ends``)."""

from __future__ import annotations

import time
from pathlib import Path

from ztfd import store
from ztfd.ingest import seen_ends


def test_ends_are_kept_only_whole_and_taken_only_while_fresh(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite")
    try:
        heard = {0: 12, 1: None}  # partition 1 not fetched yet: its end unknown
        assert not seen_ends.record(conn, "t", [0, 1], heard.get)
        assert seen_ends.fresh(conn) == {}

        heard[1] = 0
        assert seen_ends.record(conn, "t", [1, 0], heard.get)
        ends, at = seen_ends.fresh(conn)["t"]
        assert ends == {0: 12, 1: 0} and abs(at - time.time()) < 60
        assert seen_ends.fresh(conn, now=at + seen_ends.FRESH_FOR + 1) == {}  # the consumer is gone or stuck

        seen_ends.forget(conn, "t")  # a broker error: status must ask the broker itself
        assert seen_ends.fresh(conn) == {}
    finally:
        conn.close()
