"""What one pass did: the figures its summary line, its log line and ``sync.last_pass`` report."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassResult:
    files: int = 0
    bytes: int = 0
    failures: int = 0
    pending: int = 0  # rows still pending after the pass
    seconds: float = 0.0
    error: str | None = None
    interrupted: bool = False
    deleted_local: int = 0
    deleted_remote: int = 0  # objects deleted from S3: their files were replaced by files of other names
    unverified: int = 0  # files retention could not verify on S3 (kept)
    requeued: int = 0  # files retention queued for upload again
    warning: str | None = None  # a problem that loses nothing (so the pass may still be ok): sync.last_error
    reconciled: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures and not self.interrupted and not self.pending
