"""A test-only message format whose decoder dies for real: ``kill`` makes it send itself SIGSEGV, as a C extension
crashing would; any other message is Lasair JSON. Registered on import (``python -c "import tests.killer_source;
..."`` runs the consumer with it)."""

from __future__ import annotations

import os
import signal
from typing import Any

from ztfd import sources

FORMAT = "test-killer"
KILLER = b"kill"


@sources.register(FORMAT)
class KillerSource:
    format = FORMAT

    def __init__(self, **_settings: Any) -> None:
        self.lasair = sources.source_for("lasair")

    def decode(self, value: bytes | None, key: bytes | None) -> sources.Alert:
        if value == KILLER:
            os.kill(os.getpid(), signal.SIGSEGV)
        return self.lasair.decode(value, key)


CONSUME = "import sys, tests.killer_source; from ztfd.cli import main; sys.argv[0] = 'ztfd'; main()"
