"""What every bench section shares: results with goals, medians, RSS sampling per role, polling the store.

Every figure is measured in the same run on the same machine as its baseline, as the median of ``runs`` runs.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import psutil

from ztfd.embedded import demo
from ztfd.embedded.demo import child_env, ztfd_argv

T = TypeVar("T")

ROLE_BY_COMMAND = {"consume": "consumer", "fetch": "fetcher", "sync": "syncer", "start": "supervisor"}


@dataclass
class Settings:
    runs: int = 3
    quick: bool = False
    soak: bool = False
    workdir: Path = Path("/tmp")

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Row:
    """One line of the table: a figure, what it is compared with, and the goal it is judged against."""

    section: str
    name: str
    value: float | None
    unit: str
    detail: str = ""
    goal: str = ""
    passed: bool | None = None

    def cells(self) -> list[str]:
        value = "-" if self.value is None else _fmt(self.value)
        verdict = {True: "PASS", False: "FAIL", None: ""}[self.passed]
        return [self.section, self.name, f"{value} {self.unit}".strip(), self.detail, self.goal, verdict]


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)
        for row in rows:
            print("  " + " | ".join(cell for cell in row.cells() if cell), flush=True)

    def note_rss(self, sampler: RssSampler) -> None:
        for role, peak in sampler.peaks_mb().items():
            self.peak_rss_mb[role] = max(self.peak_rss_mb.get(role, 0.0), peak)

    def to_json(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "raw": self.raw, "notes": self.notes,
                "peak_rss_mb": self.peak_rss_mb}


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.2g}"


def render(rows: Sequence[Row]) -> str:
    header = ["section", "figure", "value", "compared with", "goal", ""]
    table = [header] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")


# --- processes ---------------------------------------------------------------------------------------------


def role_of(proc: psutil.Process) -> str | None:
    """consumer / fetcher / syncer / supervisor for a ztfd process, from its command line."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return None
    if "ztfd" not in " ".join(cmdline[:3]):
        return None
    for word in cmdline:
        if word in ROLE_BY_COMMAND:
            return ROLE_BY_COMMAND[word]
    return None


def helpers_rss_mb(proc: psutil.Process) -> float:
    """The RSS of a ztfd process's helper children (a consumer's ``ztfd.ingest.filewriter`` and its forked decode
    workers, which have its command line), counted as its own. Forked workers share pages with the consumer until
    they write them: their RSS added in full overstates the memory, never understates it."""
    total, own = 0.0, None
    with contextlib.suppress(psutil.Error):
        own = proc.cmdline()
    for child in proc.children():
        with contextlib.suppress(psutil.Error):
            cmdline = child.cmdline()
            if "ztfd.ingest.filewriter" in cmdline or cmdline == own:
                total += child.memory_info().rss / 2**20
    return total


class Sampler:
    """Calls ``sample()`` every ``interval`` seconds in a thread, while its ``with`` block runs."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


class RssSampler(Sampler):
    """Samples the RSS of given root processes and all their descendants by role, in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(interval)
        self.roots: list[int] = []
        self.samples: dict[str, list[tuple[float, float]]] = {}  # role -> [(t, rss MB)] (max over same-role procs)

    def watch(self, pid: int) -> None:
        self.roots.append(pid)

    def sample(self) -> None:
        now = time.monotonic()
        by_role: dict[str, float] = {}
        for pid in list(self.roots):
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                role = role_of(proc)
                if role is None:
                    continue
                try:
                    rss = proc.memory_info().rss / 2**20 + helpers_rss_mb(proc)
                except psutil.Error:
                    continue
                by_role[role] = max(by_role.get(role, 0.0), rss)
        for role, rss in by_role.items():
            self.samples.setdefault(role, []).append((now, rss))

    def peaks_mb(self) -> dict[str, float]:
        return {role: max(rss for _, rss in series) for role, series in self.samples.items() if series}


@contextlib.contextmanager
def ztfd_child(config_path: Path, *args: str, log_path: Path, sampler: RssSampler | None = None,
               stop_timeout: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """A ``ztfd`` subcommand as a child (own session), SIGTERMed and reaped on exit, descendants included."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(ztfd_argv(config_path, *args), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True)
    if sampler is not None:
        sampler.watch(proc.pid)
    try:
        yield proc
    finally:
        stop_tree(proc, stop_timeout)


def stop_tree(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    demo.stop_tree([proc], descendants, timeout)


def python_child(module: str, *args: str, log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=out,
                                stdin=subprocess.DEVNULL, env=child_env())


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "") -> T:
    """Poll ``predicate`` until it returns something true, which is returned."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
        time.sleep(interval)
    return value


def machine() -> dict[str, Any]:
    import platform

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
