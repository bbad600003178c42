"""Manifest-driven upload to S3: ``ztfd sync`` (the daemon's syncer) and ``ztfd sync --once`` (cron).

Why a manifest: after a year the archive holds millions of small files, and a sync that lists the bucket or walks
the tree (``aws s3 sync``, rclone) costs time in proportion to everything ever stored. Every file ztfd writes is
recorded in the store's ``manifest`` table when it is on disk (``store.record_files``), so a pass reads only the
rows in state ``pending`` (a partial index) and costs nothing when there is nothing new. It never lists the bucket;
only ``--full`` walks ``data/`` and ``images/`` to pick up files added, changed or removed by hand.

Each upload is verified before its row says ``done`` and marked done the moment it is, with at most
``s3.concurrency`` uploads in flight, so a kill -9 re-sends at most those, and never a file marked done. One pass
at a time holds ``<home>/state/sync.lock`` (flock), so ``sync --once`` beside the daemon never uploads twice or
interleaves manifest updates.

The modules, one concept each:

- ``command``: the ``ztfd sync`` entry (modes, signals, exit codes); ``report``: its terminal output.
- ``daemon``: the syncer's loop (a pass every ``s3.interval``, sooner after a failure; heartbeats).
- ``passes``: one pass under ``lock`` (reconcile, uploads, retention, its record in ``status``).
- ``pending``: the pool that uploads every pending row; ``upload``: one file to S3 and its verification.
- ``s3``: the client, the keys, and what S3's errors mean for a pass.
- ``reconcile``: ``--full``; ``dryrun``: ``--dry-run``; ``retention``: ``s3.delete_local_after_days``.
- ``status``: what a pass records for ``ztfd status`` and the summary status reads back.

All their SQL is in ``ztfd.store.manifest``. The package itself exports only the light parts other commands use
(``pass_lock``, and ``summary`` for ``ztfd status``); the CLI imports ``command`` for ``ztfd sync``, so that status
does not load the upload machinery.
"""

from ztfd.sync.lock import pass_lock
from ztfd.sync.status import summary

__all__ = ["pass_lock", "summary"]
