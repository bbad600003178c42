"""The night report never fails a night for one alert: light-curve fields of unexpected types are left out of
that object's curve, its card says so, and the other cards are drawn as usual (through the broker, the consumer
and ``ztfd report``)."""

from __future__ import annotations

import html
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests import test_consumer
from tests.conftest import child_env, ztfd_command
from tests.test_avro_streams import consume_all
from tests.test_consumer import Consumers, unique
from ztfd.embedded.kafka import KafkaBroker
from ztfd.reporting import lightcurve

consumers = test_consumer.consumers  # the fixture: ``ztfd consume`` children stopped after the test

JD = 2459458.7  # 2021-09-01 UTC
NIGHT = "2021-09-01"


def ztf(object_id: str, **fields: object) -> dict[str, object]:
    message: dict[str, object] = {
        "objectId": object_id, "jd": JD,
        "candidate": {"jd": JD, "fid": 2, "magpsf": 19.5, "sigmapsf": 0.1},
        "prv_candidates": [{"jd": JD - 3, "fid": 1, "magpsf": 19.9, "sigmapsf": 0.2}],
    }
    message.update(fields)
    return message


HOSTILE = {
    "ZTF21aaaaaab": ({"prv_candidates": 5}, ["prv_candidates (a number)"]),
    "ZTF21aaaaaac": ({"prv_candidates": [{"jd": JD - 2, "fid": [1], "magpsf": 19.0, "sigmapsf": 0.1},
                                         {"jd": JD - 1, "fid": 1, "magpsf": 19.1, "sigmapsf": None},
                                         {"jd": JD - 1, "fid": 1, "magpsf": 19.1, "sigmapsf": 0.05},
                                         {"jd": "yesterday", "fid": 1, "magpsf": 19.2, "sigmapsf": 0.1},
                                         {"jd": JD - 4, "fid": 1, "magpsf": "bright", "sigmapsf": 0.1},
                                         7]},
                     ["fid (an array)", "sigmapsf (null)", "jd (a string)", "magpsf (a string)",
                      "prv_candidates[] (a number)"]),
    "ZTF21aaaaaad": ({"candidate": {"jd": JD, "fid": 2, "magpsf": 1e308, "sigmapsf": 1e308}, "prv_candidates": None},
                     []),
}



def test_hostile_light_curve_fields_are_left_out_and_the_card_says_so() -> None:
    unit, points, left_out = lightcurve.history_points(ztf("ZTF21aaaaaac", **HOSTILE["ZTF21aaaaaac"][0]))
    assert unit == lightcurve.MAG and set(left_out) == set(HOSTILE["ZTF21aaaaaac"][1])
    assert [(round(p.mjd - 59458.2, 1), p.band, p.value, p.error) for p in points] == [
        (-1.0, "g", 19.1, None), (-1.0, "g", 19.1, 0.05), (0.0, "r", 19.5, 0.1)]
    lsst = {"diaObjectId": 1, "alert": {"diaSourcesList": 5, "diaSource": {
        "midpointMjdTai": 61000.1, "band": ["g"], "psfFlux": 10.0}}}
    assert lightcurve.history_points(lsst) == (lightcurve.FLUX, [], ("diaSourcesList (a number)", "band (an array)"))
    assert lightcurve.alerce_points(b'[{"mjd": 59000.1, "fid": [1], "magpsf": 19.0}, {"mjd": 59000.2, "fid": 1, '
                                    b'"magpsf": 19.0, "sigmapsf": null}, {"mjd": 59000.2, "fid": 1, "magpsf": 19.0, '
                                    b'"sigmapsf": 0.1}]') == [lightcurve.Point(59000.2, "g", 19.0, None),
                                                              lightcurve.Point(59000.2, "g", 19.0, 0.1)]


def test_a_night_with_hostile_light_curve_fields_gets_its_report_with_every_card(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers,
) -> None:
    topic = unique("report_hostile")
    kafka.create_topic(topic)
    messages = [ztf("ZTF21aaaaaaa")] + [ztf(oid, **fields) for oid, (fields, _) in HOSTILE.items()]
    kafka.produce(topic, [json.dumps(m).encode() for m in messages])
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic]})
    consume_all(consumers, config_path, topic, alerts=len(messages))
    result = subprocess.run(ztfd_command(config_path, "report", "--date", NIGHT), capture_output=True, text=True,
                            env=child_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"({len(messages)} objects" in result.stdout
    page = html.unescape((config_path.parent / "reports" / NIGHT / "index.html").read_text(encoding="utf-8"))
    cards = {chunk.split('"', 1)[0]: chunk for chunk in page.split('<article class="card" id="')[1:]}
    assert set(cards) == {m["objectId"] for m in messages}
    lc = config_path.parent / "reports" / NIGHT / "lc"
    assert (lc / "ZTF21aaaaaaa.png").read_bytes().startswith(b"\x89PNG")
    assert "left out" not in cards["ZTF21aaaaaaa"] and 'class="lc"' in cards["ZTF21aaaaaaa"]
    for object_id, (_, left_out) in HOSTILE.items():
        for note in left_out:
            assert note in cards[object_id], (object_id, note)
    assert 'class="lc"' in cards["ZTF21aaaaaab"]  # its candidate alone still makes a curve
    assert 'class="lc"' in cards["ZTF21aaaaaac"]
    drawn_or_said = 'class="lc"' in cards["ZTF21aaaaaad"] or "could not be drawn" in cards["ZTF21aaaaaad"]
    assert drawn_or_said, cards["ZTF21aaaaaad"]
