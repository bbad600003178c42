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
from typing import Any, NamedTuple

from ztfd.sources import DAY_OBS, JD_MJD_OFFSET, UTC_DATE, Alert, TimeField

# Rubin's observing day starts 12 h (TAI) after 00:00 TAI.
DAY_OBS_ROLLOVER_DAYS = 0.5
# What dated an alert when it carried no observation time (``Dating.dated_by``).
BY_UTC_FIELD = "UTC"
BY_KAFKA_TIMESTAMP = "kafka_timestamp"
BY_RECEIVED_AT = "received_at"


class Dating(NamedTuple):
    """An alert's partition date, the rule that made it and the field (or moment) it came from."""

    date: str  # YYYY-MM-DD
    rule: str  # UTC_DATE or DAY_OBS
    dated_by: str  # a time field's key, "UTC", "kafka_timestamp" or "received_at"


def iso_utc(moment: dt.datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``: how ztfd writes every time it adds."""
    # isoformat, not strftime: the same text (milliseconds truncated), at a fraction of the cost (once per alert)
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_utc_ms(stamp_ms: int) -> str:
    """``iso_utc`` of a time in milliseconds since the epoch (a Kafka timestamp), the same text at a third of the
    cost: a topic's messages come many to a second, and the second's text is made once (it was ~4% of the
    consumer's main thread on ``bin/bench ingest``)."""
    second, millis = divmod(stamp_ms, 1000)
    return f"{_second_text(second)}.{millis:03d}Z"


@functools.lru_cache(maxsize=64)
def _second_text(second: int) -> str:
    return dt.datetime.fromtimestamp(second, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "")


def is_number(value: Any) -> bool:
    """A JSON number usable as a value: not a bool, not NaN or ±Infinity (Lasair writes those bare)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ERFA "dubious year" for future dates; the leap-second table's age
        yield


class ObservedTimes(NamedTuple):
    """What an alert's time fields say, converted (``convert_times``): ISO 8601 UTC per time field, the
    observation time (MJD UTC, ISO UTC), its day under the alert's ``date_rule`` (YYYY-MM-DD) and the key of the
    field it came from (the source's ``observation_key``, or the newest field for a UTC-dated alert naming none)."""

    times_utc: dict[str, str]
    obs_mjd: float | None = None
    obs_iso: str | None = None
    obs_day: str | None = None
    observation_key: str | None = None


def convert_times(alerts: Sequence[Alert]) -> list[ObservedTimes]:
    """The ``ObservedTimes`` of each of a batch of alerts (in their order), one astropy call per kind and scale of
    field. The alerts are not changed.

    Every time field gets its ISO 8601 UTC string (bookkeeping and model times too: they are the alert's data).
    The observation time is the one ``observation_key`` names; an alert dated by the UTC date that names none
    takes its newest time field (what sources without a rule of their own expect); a Rubin alert that names
    none has no observation time (its other times are processing or model times). The observation's day under
    the alert's rule (UTC date, or dayObs) is worked out here too, so that dating needs no astropy call of its own.
    """
    from astropy.time import Time

    count = len(alerts)
    times_utc: list[dict[str, str]] = [{} for _ in range(count)]
    obs_mjd: list[float | None] = [None] * count
    obs_iso: list[str | None] = [None] * count
    obs_day: list[str | None] = [None] * count
    keys = [alert.observation_key for alert in alerts]
    groups: dict[tuple[str, str], list[tuple[int, TimeField]]] = defaultdict(list)
    for index, alert in enumerate(alerts):
        for time_field in alert.times:
            groups[(time_field.kind, time_field.scale)].append((index, time_field))
    for (kind, scale), members in groups.items():
        with _quiet():
            times = Time([tf.value for _, tf in members], format=kind, scale=scale)
            utc = times.utc
            isots, mjds = isot_strings(utc), utc.mjd
        rubin = []
        for position, ((index, time_field), iso, mjd) in enumerate(zip(members, isots, mjds, strict=True)):
            times_utc[index][time_field.key] = f"{iso}Z"
            alert = alerts[index]
            chosen = alert.observation_key == time_field.key
            newest = (alert.observation_key is None and alert.date_rule == UTC_DATE
                      and (obs_mjd[index] is None or mjd > obs_mjd[index]))
            if chosen or newest:
                text = str(iso)
                obs_mjd[index], obs_iso[index], obs_day[index] = float(mjd), text, text[:10]
                if newest:
                    keys[index] = time_field.key  # what dated it, for the alert file
                if alert.date_rule == DAY_OBS:
                    rubin.append(position)
        if rubin:
            for position, day in zip(rubin, _day_obs_of(times[rubin]), strict=True):
                obs_day[members[position][0]] = day
    return [ObservedTimes(*fields) for fields in zip(times_utc, obs_mjd, obs_iso, obs_day, keys, strict=True)]


def warm_up() -> None:
    """Load astropy's time machinery and its leap-second table now: a consumer calls this at start, so that its
    first batch does not wait ~0.3 s for them (``bin/bench ingest`` counts that wait in a 2-second run)."""
    from astropy.time import Time

    with _quiet():
        isot_strings(Time([60000.0], format="mjd", scale="tai").utc)


def isot_strings(utc: Any) -> list[str]:
    """``utc.isot`` (milliseconds), formatted by numpy from astropy's UTC times.

    astropy's formatter took a quarter of the consumer's time on Lasair-LSST full output (45 time fields per
    alert); numpy writes the same strings ~15x faster. Days with a leap second, whose UTC day fractions count
    86,401 seconds, go through astropy's formatter."""
    import numpy as np

    day_start = np.floor(utc.jd1 - JD_MJD_OFFSET) + np.floor(utc.jd2)
    if _has_leap_second(np.unique(day_start)):
        return [str(iso) for iso in utc.isot]
    millis = np.round((utc.jd1 - JD_MJD_OFFSET - MJD_EPOCH_OFFSET + utc.jd2) * 86_400_000.0).astype("int64")
    return list(np.datetime_as_string(millis.astype("datetime64[ms]"), unit="ms"))


MJD_EPOCH_OFFSET = 40587.0  # MJD of 1970-01-01, numpy's epoch


def _has_leap_second(days: Any) -> bool:
    """True if any of these UTC days (MJD) ends with a leap second (TAI - UTC grows overnight)."""
    from astropy.time import Time

    with _quiet():
        start = Time(days, format="mjd", scale="utc")
        end = Time(days + 1, format="mjd", scale="utc")
        step = (end.tai.jd1 - end.jd1 + end.tai.jd2 - end.jd2) - (start.tai.jd1 - start.jd1 + start.tai.jd2 - start.jd2)
    return bool((abs(step) * 86400.0 > 0.5).any())


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


def day_obs_of_moment(moment: dt.datetime) -> str:
    """dayObs of a UTC moment (Lasair's ``UTC`` field, a Kafka timestamp): TAI is UTC plus the leap seconds of
    that day (from astropy), minus 12 hours. (Inside a leap second itself this is a second off; none since 2017.)"""
    utc = moment.astimezone(dt.UTC)
    tai = utc + tai_minus_utc(utc.date())
    return (tai - dt.timedelta(days=DAY_OBS_ROLLOVER_DAYS)).date().isoformat()


@functools.lru_cache(maxsize=512)
def tai_minus_utc(day: dt.date) -> dt.timedelta:
    """TAI − UTC at the start of a UTC day (37 s since 2017-01-01), from astropy's leap-second table."""
    from astropy.time import Time

    with _quiet():
        start = Time(day.isoformat(), format="iso", scale="utc")
        return dt.timedelta(seconds=round(float((start.tai.mjd - start.mjd) * 86400.0), 3))


def date_of(alert: Alert, observed: ObservedTimes, kafka_timestamp: dt.datetime | None,
            received_at: dt.datetime) -> Dating:
    """The alert's partition date, from its ``convert_times`` result: its observation time's day under its
    survey's rule, else that of Lasair's ``UTC`` field, else of the Kafka timestamp (the same at every
    redelivery), else of the receive time."""
    rule = alert.date_rule
    if observed.obs_day is not None and observed.observation_key is not None:
        return Dating(observed.obs_day, rule, observed.observation_key)
    if isinstance(alert.utc_field, dt.datetime):
        utc_field = alert.utc_field  # naive means UTC (Lasair writes no zone)
        moment = utc_field.replace(tzinfo=dt.UTC) if utc_field.tzinfo is None else utc_field
        dated_by = BY_UTC_FIELD
    elif kafka_timestamp is not None:
        moment, dated_by = kafka_timestamp, BY_KAFKA_TIMESTAMP
    else:
        moment, dated_by = received_at, BY_RECEIVED_AT
    if rule == DAY_OBS:
        return Dating(day_obs_of_moment(moment), rule, dated_by)
    return Dating(moment.astimezone(dt.UTC).date().isoformat(), UTC_DATE, dated_by)
