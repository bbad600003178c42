"""The real ZTF alert packets shipped in ``ztfd/samples/`` and Lasair-shaped messages built from them.

The packets (provenance in ``ztfd/samples/PROVENANCE.md``) carry real gzipped FITS cutouts; the stamp service
of ``ztfd.embedded.alerce`` serves exactly those bytes, and tests compare what ztfd saved against them.
Messages follow the shapes of Lasair's Kafka output (``ztfd/samples/lasair-examples.md``): the filter's SELECT
columns plus ``UTC``, no candid, no key.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ztfd.sources import JD_MJD_OFFSET

CUTOUT_FIELDS = {"science": "cutoutScience", "template": "cutoutTemplate", "difference": "cutoutDifference"}


@dataclass(frozen=True)
class SamplePacket:
    path: Path
    object_id: str
    candid: int
    jd: float
    ra: float
    dec: float
    magpsf: float
    fid: int
    jdstarthist: float | None
    cutouts: dict[str, bytes]  # stamp type -> gzipped FITS bytes, as ALeRCE serves them

    @property
    def mjd(self) -> float:
        return self.jd - JD_MJD_OFFSET


def samples_dir() -> Path:
    return Path(str(resources.files("ztfd") / "samples"))


@functools.cache
def packets() -> tuple[SamplePacket, ...]:
    """Every sample packet with a ZTF objectId, sorted by objectId and candid."""
    import fastavro

    found = []
    for path in sorted(samples_dir().glob("*.avro")):
        with path.open("rb") as handle:
            record = next(iter(fastavro.reader(handle)))
        candidate = record["candidate"]
        found.append(
            SamplePacket(
                path=path,
                object_id=record["objectId"],
                candid=int(record["candid"]),
                jd=float(candidate["jd"]),
                ra=float(candidate["ra"]),
                dec=float(candidate["dec"]),
                magpsf=float(candidate["magpsf"]),
                fid=int(candidate["fid"]),
                jdstarthist=candidate.get("jdstarthist"),
                cutouts={kind: record[field]["stampData"] for kind, field in CUTOUT_FIELDS.items()},
            )
        )
    return tuple(sorted(found, key=lambda p: (p.object_id, p.candid)))


def lasair_message(packet: SamplePacket, shape: str = "sn", run_delay_minutes: float = 17.0) -> dict[str, Any]:
    """One Lasair Kafka message about ``packet``'s object, in one of the documented shapes.

    Shapes: ``sn`` (the SN-like filter: mjdmin/mjdmax, mags, classification, UTC), ``heartbeat`` (objectId and
    UTC only), ``refresh`` (a topic_refresh row: raw jdmin/jdmax, no UTC).
    """
    observed = dt.datetime(1858, 11, 17) + dt.timedelta(days=packet.mjd)
    utc = (observed + dt.timedelta(minutes=run_delay_minutes)).strftime("%Y-%m-%d %H:%M:%S")
    if shape == "heartbeat":
        return {"objectId": packet.object_id, "UTC": utc}
    if shape == "refresh":
        return {
            "objectId": packet.object_id,
            "jdmin": packet.jdstarthist or packet.jd,
            "jdmax": packet.jd,
            "rmag": packet.magpsf if packet.fid == 2 else None,
        }
    jdmin = packet.jdstarthist or packet.jd
    return {
        "objectId": packet.object_id,
        "ramean": packet.ra,
        "decmean": packet.dec,
        "mjdmin": jdmin - JD_MJD_OFFSET,
        "mjdmax": packet.mjd,
        "magrmin": packet.magpsf if packet.fid == 2 else None,
        "rmag": packet.magpsf if packet.fid == 2 else None,
        "classification": "SN",
        "score": "Not Near PS1 star",
        "UTC": utc,
    }


DEFAULT_SHAPES = ("sn", "sn", "heartbeat", "refresh")


def message_stream(count: int, shapes: tuple[str, ...] = DEFAULT_SHAPES) -> Iterator[dict[str, Any]]:
    """``count`` messages cycling through the sample objects and shapes, each made unique by a ``seq`` field.

    The ``seq`` column stands for any extra SELECT column; it lets a test tell every message apart.
    """
    combos = itertools.cycle(itertools.product(packets(), shapes))
    for seq, (packet, shape) in zip(range(count), combos, strict=False):
        message = lasair_message(packet, shape)
        message["seq"] = seq
        yield message
