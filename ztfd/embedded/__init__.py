"""Local stand-ins for the outside world, for ``ztfd demo``, ``bin/bench`` and the tests.

Each is a real service on 127.0.0.1, started and stopped by its owner: a Tansu Kafka broker (``kafka``), a
moto S3 server (``s3``), and an ALeRCE-like stamp service that serves the real cutouts of the sample packets
with injectable faults (``alerce``). ``samples`` reads the packets shipped in ``ztfd/samples/``.
"""
