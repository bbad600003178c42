"""Observation times and the night an alert belongs to: the date that names its folders.

Two rules (``sources.UTC_DATE``, ``sources.DAY_OBS``), chosen by the alert's survey:

- ZTF: the **UTC date** of the observation. A Palomar night never crosses 00:00 UTC, so this is also ZTF's own
  night date (the ``nid`` in every candid, the ``ztf_YYYYMMDD`` topics).
- Rubin: **dayObs**, the TAI date of the observation time minus 12 hours (Rubin's definition, LSE-400 /
  SITCOMTN-032, as in ``obs_lsst``): a Chilean night crosses 00:00 UTC, and dayObs keeps the whole night in one
  folder. Written ``YYYY-MM-DD`` like ZTF's folders (Rubin writes it ``YYYYMMDD``).

An alert is dated by its observation time when the source found one (``Alert.observation_key``); otherwise by
Lasair's ``UTC`` field (the filter's run time), then the Kafka timestamp, then the time ztfd received it, each
with the survey's rule. ``Dating.dated_by`` says which, and the alert file records it.

Times are converted with astropy, a batch at a time (one ``Time`` per kind and scale of field, not one per value).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import math
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ztfd.sources import DAY_OBS, UTC_DATE, Alert, TimeField

JD_MJD_OFFSET = 2400000.5
# Rubin's observing day starts 12 h (TAI) after 00:00 TAI.
DAY_OBS_ROLLOVER_DAYS = 0.5
# What dated an alert when it carried no observation time (``Dating.dated_by``).
BY_UTC_FIELD = "UTC"
BY_KAFKA_TIMESTAMP = "kafka_timestamp"
BY_RECEIVED_AT = "received_at"


@dataclass(frozen=True)
class Dating:
    """An alert's partition date, the rule that made it and the field (or moment) it came from."""

    date: str  # YYYY-MM-DD
    rule: str  # UTC_DATE or DAY_OBS
    dated_by: str  # a time field's key, "UTC", "kafka_timestamp" or "received_at"


def iso_utc(moment: dt.datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``: how ztfd writes every time it adds."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def is_number(value: Any) -> bool:
    """A JSON number usable as a value: not a bool, not NaN or ±Infinity (Lasair writes those bare)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ERFA "dubious year" for future dates; the leap-second table's age
        yield


def convert_times(alerts: Sequence[Alert]) -> None:
    """Fill ``times_utc``, ``obs_mjd``, ``obs_iso`` and ``obs_day`` of a batch of alerts, one astropy call per
    kind and scale of field.

    Every time field gets its ISO 8601 UTC string (bookkeeping and model times too: they are the alert's data);
    only the one named by ``observation_key`` becomes the observation time, and its day under the alert's rule
    (UTC date, or dayObs) is worked out here too, so that dating needs no astropy call of its own."""
    from astropy.time import Time

    groups: dict[tuple[str, str], list[tuple[Alert, TimeField]]] = defaultdict(list)
    for alert in alerts:
        for time_field in alert.times:
            groups[(time_field.kind, time_field.scale)].append((alert, time_field))
    for (kind, scale), members in groups.items():
        with _quiet():
            times = Time([tf.value for _, tf in members], format=kind, scale=scale)
            utc = times.utc
            isots, mjds = utc.isot, utc.mjd
        for (alert, time_field), iso in zip(members, isots, strict=True):
            alert.times_utc[time_field.key] = f"{iso}Z"
        observed = [i for i, (alert, tf) in enumerate(members) if tf.key == alert.observation_key]
        rubin = [i for i in observed if members[i][0].date_rule == DAY_OBS]
        days = dict(zip(rubin, _day_obs_of(times[rubin]), strict=True)) if rubin else {}
        for index in observed:
            alert = members[index][0]
            alert.obs_mjd = float(mjds[index])
            alert.obs_iso = str(isots[index])
            alert.obs_day = days.get(index, alert.obs_iso[:10])


def _day_obs_of(times: Any) -> list[str]:
    """dayObs of astropy times (any scale): the TAI date 12 h earlier."""
    from astropy.time import TimeDelta

    with _quiet():
        shifted = times.tai - TimeDelta(DAY_OBS_ROLLOVER_DAYS, format="jd", scale="tai")
        return [str(iso)[:10] for iso in shifted.isot]


def day_obs(mjd_tai: float) -> str:
    """dayObs (``YYYY-MM-DD``) of one TAI MJD."""
    from astropy.time import Time

    with _quiet():
        return _day_obs_of(Time([mjd_tai], format="mjd", scale="tai"))[0]


@functools.lru_cache(maxsize=1024)
def day_obs_of_moment(moment: dt.datetime) -> str:
    """dayObs of a UTC moment (Lasair's ``UTC`` field, a Kafka timestamp): TAI is UTC plus the leap seconds.

    Cached: every row of one Lasair filter run carries the same ``UTC``."""
    from astropy.time import Time

    utc = moment.astimezone(dt.UTC).replace(tzinfo=None)
    with _quiet():
        return _day_obs_of(Time([utc.isoformat()], format="isot", scale="utc"))[0]


def date_of(alert: Alert, kafka_timestamp: dt.datetime | None, received_at: dt.datetime) -> Dating:
    """The alert's partition date (after ``convert_times``): its observation time's day under its survey's rule,
    else that of Lasair's ``UTC`` field, else of the Kafka timestamp (the same at every redelivery), else of
    the receive time."""
    rule = alert.date_rule
    if alert.obs_day is not None and alert.observation_key is not None:
        return Dating(alert.obs_day, rule, alert.observation_key)
    if isinstance(alert.utc_field, dt.datetime):
        moment, dated_by = alert.utc_field.replace(tzinfo=dt.UTC), BY_UTC_FIELD
    elif kafka_timestamp is not None:
        moment, dated_by = kafka_timestamp, BY_KAFKA_TIMESTAMP
    else:
        moment, dated_by = received_at, BY_RECEIVED_AT
    if rule == DAY_OBS:
        return Dating(day_obs_of_moment(moment), rule, dated_by)
    return Dating(moment.astimezone(dt.UTC).date().isoformat(), UTC_DATE, dated_by)
