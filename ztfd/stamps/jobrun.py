"""One stamp job's way through the fetcher: what it asks, where its files live, what was on disk, fetched and
written, and what went wrong; and the file steps the fetcher runs on its side thread (take what is valid on disk,
check and write what was fetched, draw the preview), which fill it in. ``ztfd.stamps.settle`` writes the outcome.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztfd.config import StampsConfig
from ztfd.files import atomic_write, md5_hex, relative_to_home, remove_stale_temporaries
from ztfd.sources import PLAIN_ID, STAMP_TYPES
from ztfd.stamps.providers import Detection, FetchError, NotYetAvailableError, StampProvider, StampRequest
from ztfd.store import jobs
from ztfd.store.states import FailureClass, JobKind

log = logging.getLogger(__name__)

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}\Z")
ManifestRow = tuple[str, int, str]  # path under home, size, MD5


class BadPayloadError(Exception):
    """A job that can never succeed as written (e.g. an objectId that could leave its folder)."""


@dataclass(frozen=True)
class Stamp:
    """A stamp's bytes and the image they hold (for the preview)."""

    data: bytes
    image: Any


@dataclass(frozen=True)
class StampFiles:
    """Where one detection's files live: ``images/<date>/<object_id>/``, named by the provider."""

    folder: Path
    provider: StampProvider
    detection_id: str

    def stamp(self, kind: str) -> Path:
        return self.folder / self.provider.file_name(self.detection_id, kind)

    @property
    def preview(self) -> Path:
        return self.folder / f"{self.detection_id}.png"

    def valid(self, kind: str) -> Stamp | None:
        """The stamp on disk if it is there and valid (an invalid one is logged and will be replaced)."""
        return valid_file(self.stamp(kind), self.provider)


@dataclass
class JobRun:
    """One job's way through the fetcher: what it asks, the detection, what was on disk, fetched, written, and
    what went wrong. The steps of ``Fetcher.process`` (and ``existing`` and ``write`` here) fill it in turn;
    ``Settler.settle`` reads it."""

    job: jobs.StampJob
    request: StampRequest
    provider: StampProvider
    folder: Path
    force: bool = False
    detection: Detection | None = None
    have: dict[str, Stamp] = field(default_factory=dict)  # valid on disk before this run
    fetched: dict[str, bytes] = field(default_factory=dict)  # served bodies, not yet checked
    extras: dict[str, bytes] = field(default_factory=dict)  # files served beside the stamps (get_avro's packet)
    problems: list[BaseException] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # kinds written by this run
    preview: bool = False  # drawn by this run
    files: list[ManifestRow] = field(default_factory=list)  # every file of the job on disk now

    @property
    def label(self) -> str:
        return f"job {self.job.id} {self.request.object_id}"

    @property
    def paths(self) -> StampFiles:
        assert self.detection is not None
        return StampFiles(self.folder, self.provider, self.detection.detection_id)

    @property
    def missing(self) -> list[str]:
        return [kind for kind in STAMP_TYPES if kind not in self.have]

    def take(self, kinds: list[str], results: list[Any]) -> None:
        """Sort the answers of the fetches of ``kinds`` into bodies and problems."""
        for kind, result in zip(kinds, results, strict=True):
            if isinstance(result, BaseException):
                self.problems.append(result)
            else:
                self.fetched[kind] = result

    def verdict(self) -> BaseException | None:
        """The problem the job is settled by: a programming error first, then a failure (retried on the failure
        schedule), else "not yet" (the slower one); None when there was none."""
        for problem in self.problems:
            if not isinstance(problem, NotYetAvailableError | FetchError):
                return problem
        failures = [p for p in self.problems if isinstance(p, FetchError)]
        return failures[0] if failures else (self.problems[0] if self.problems else None)

    def result(self, worker: str) -> jobs.StampResult:
        """What the job learned, kept with its alert (``ztfd replay`` reuses the detection)."""
        assert self.detection is not None
        return jobs.StampResult(self.detection.detection_id, self.detection.mjd, tuple(self.written), self.preview,
                                worker)


def valid_file(path: Path, provider: StampProvider) -> Stamp | None:
    """The stamp at ``path`` if it is there and ``provider`` finds it valid; an invalid one is logged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Stamp(data, provider.check(data))
    except ValueError as exc:
        log.warning("replacing invalid stamp %s: %s", path, exc)
        return None


def new_run(job: jobs.StampJob, provider_of: Callable[[jobs.StampJob], StampProvider], images_dir: Path) -> JobRun:
    """The job's request, checked: what becomes a folder or file name must be plain, the survey must have a
    provider (``provider_of`` raises ``BadPayloadError`` if not). A detection the message named, or an earlier run
    chose (replay), is used without a lookup."""
    alert = job.alert
    if not PLAIN_ID.match(alert.object_id):
        raise BadPayloadError(f"bad object_id {alert.object_id!r}")
    if not DATE.match(alert.date):
        raise BadPayloadError(f"bad date {alert.date!r}")
    provider = provider_of(job)
    known, known_mjd = (alert.detection_id, None) if job.known is None else (job.known.detection_id,
                                                                             job.known.detection_mjd)
    if known is not None and not PLAIN_ID.match(known):
        raise BadPayloadError(f"bad detection id {known!r}")
    if known is None and job.kind == JobKind.PREVIEW:
        raise BadPayloadError("a preview job whose alert names no detection")
    request = StampRequest(alert.survey, alert.object_id, alert.date, alert.obs_mjd, known, known_mjd, alert.band)
    run = JobRun(job, request, provider, images_dir / alert.date / alert.object_id, force=job.force)
    if known is not None:
        run.detection = Detection(known, alert.obs_mjd if known_mjd is None else known_mjd)
    return run


# --- the side steps (run off the event loop: FITS checks, writes, previews) ------------------------------------


def existing(run: JobRun) -> None:
    """Take the valid stamps already on disk (a side step)."""
    for kind in STAMP_TYPES:
        found = run.paths.valid(kind)
        if found is not None:
            run.have[kind] = found

def write(run: JobRun, settings: StampsConfig, home: Path) -> None:
    """Check and write the fetched stamps, then the preview; list in ``run.files`` every file of the job on
    disk (written now or valid already), even when a stamp failed."""
    paths = run.paths
    if paths.folder.is_dir():  # temporaries of a writer killed with -9 (a live one's are left alone)
        remove_stale_temporaries(paths.folder)
    triplet = dict(run.have)
    for kind, data in run.fetched.items():
        try:
            image = run.provider.check(data)
        except ValueError as exc:
            run.problems.append(FetchError(f"{kind} stamp: {exc}", FailureClass.BAD_BODY))
            continue
        atomic_write(paths.stamp(kind), data)
        triplet[kind] = Stamp(data, image)
        run.written.append(kind)
    run.files = [_manifest_row(home, paths.stamp(kind), stamp.data) for kind, stamp in sorted(triplet.items())]
    for name, data in run.extras.items():  # served beside the stamps (get_avro's alert packet)
        atomic_write(paths.folder / name, data)
        run.files.append(_manifest_row(home, paths.folder / name, data))
    if len(triplet) == len(STAMP_TYPES) and settings.previews:
        run.files.append(_preview(run, triplet, settings.preview_renderer, home))

def _preview(run: JobRun, triplet: dict[str, Stamp], renderer: str, home: Path) -> ManifestRow:
    """Draw the preview when something changed (or it is missing); its manifest row either way."""
    png, detection = run.paths.preview, run.detection
    assert detection is not None
    if run.force or run.written or not png.exists():
        from ztfd.stamps import preview

        draw = preview.RENDERERS[renderer]
        data = draw(run.request.object_id, detection.detection_id, detection.mjd,
                    {kind: stamp.image for kind, stamp in triplet.items()}, band=run.request.band,
                    label=run.provider.detection_label)
        atomic_write(png, data)
        run.preview = True
    else:
        data = png.read_bytes()
    return _manifest_row(home, png, data)

def _manifest_row(home: Path, path: Path, data: bytes) -> ManifestRow:
    return relative_to_home(home, path), len(data), md5_hex(data)
