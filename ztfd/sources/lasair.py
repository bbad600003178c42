"""Lasair JSON as a source: a thin adapter over ``ztfd.alerts`` until that module becomes this one.

(The lsst helper turns ``ztfd/alerts.py`` into this module, with the ZTF and LSST rules; this adapter only puts
today's parser behind the ``Source`` protocol, so the consumer depends on nothing but the seam.)
"""

from __future__ import annotations

import sys

from ztfd import alerts
from ztfd.sources import LSST, UTC_DATE, ZTF, Alert, InvalidMessageError, TimeField, register


@register("lasair")
class LasairJson:
    """Lasair filter rows: JSON objects with the filter's columns, ``objectId`` (ZTF) or ``diaObjectId``."""

    format = "lasair"

    def decode(self, value: bytes | None, key: bytes | None) -> Alert:
        try:
            message = alerts.parse(value, sys.maxsize)  # the consumer applies kafka.max_message_bytes
        except alerts.InvalidMessageError as exc:
            raise InvalidMessageError(str(exc)) from None
        return Alert(
            raw=message.raw,
            survey=ZTF if message.is_ztf else LSST,
            object_id=message.object_id,
            detection_id=None,  # Lasair rows name no candid: the stamp provider looks it up
            times=[TimeField(t.key, t.value, t.kind, t.scale) for t in message.times],
            observation_key=None,  # the newest time field dates the alert
            date_rule=UTC_DATE,
            utc_field=message.utc_field,
            body=message.body,
        )
