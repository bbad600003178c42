"""Coverage-guided fuzzing of everything that decodes message content (issue 21): every source's ``decode`` and
the stamp fetcher's ``get_avro`` packet parser, seeded with the real samples. ``bin/fuzz`` runs it (atheris, on
libFuzzer); ``fuzzing.targets`` holds the targets, also run briefly by the test suite."""
