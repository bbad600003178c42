"""Operating-system processes: facts about them and ties between them, needed by several ztfd modules."""

from __future__ import annotations

import ctypes  # loaded here, not between a fork and an exec (see die_with_parent's callers)
import os
from pathlib import Path

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def die_with_parent(parent: int, signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent ``parent`` dies, even by kill -9.

    The kernel sends it when the *thread* that started this process ends, so parents start such children from
    their main thread. False if the request failed or the parent died before it took effect (nobody would send
    the signal then): the caller should leave at once.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        return False
    return os.getppid() == parent
