"""ztfd configuration: one TOML file, environment overrides, strict validation.

The key names are a contract with users (docs/configuration.md). Anything unknown, mistyped or missing is
a ``ConfigError`` whose message names the key and never the value, so that secrets cannot leak into logs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztfd.text import mask_url_secrets

ENV_CONFIG = "ZTFD_CONFIG"
# Where a command looks when neither --config nor $ZTFD_CONFIG names the file: the current folder, then the user's
# own. etc/ztfd.toml of a checkout is a commented example, never read by default (it made a command's behaviour
# depend on the folder it ran from); supervisord and systemd name their file explicitly.
LOCAL_CONFIG = Path("ztfd.toml")
USER_CONFIG = Path("~/.config/ztfd/ztfd.toml")
ENV_PREFIX = "ZTFD_"

# Words that mark a value as secret: such values are masked whenever a config is shown.
SECRET_WORDS = ("password", "secret", "token", "key", "credential")
# Kafka's own rule for topic names; they also become folder names under data/, so it matters here.
KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}\Z")


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line that names the offending key."""


@dataclass(frozen=True)
class KafkaConfig:
    group_id: str
    topics: tuple[str, ...]
    bootstrap_servers: str = "kafka.lsst.ac.uk:9092"
    options: dict[str, Any] = field(default_factory=dict)
    max_message_bytes: int = 10 * 1024 * 1024  # what Lasair-LSST's broker takes (full-alert messages)
    batch_size: int = 1000
    formats: dict[str, Any] = field(default_factory=dict)  # topic -> source name (ztfd.sources); else "lasair"
    lasair_byte_quota: int = 100_000_000  # Lasair-LSST's default per-filter bytes per day; 0: no warning
    schemas: dict[str, Any] = field(default_factory=dict)  # topic -> .avsc file (format "avro"), absolute once built
    schema_registry_url: str = ""  # Confluent schema registry (format "confluent-avro")
    idle_topic_seconds: float = 86400.0  # a pattern's topic drained and quiet this long: its consumer exits
    topic_scan_seconds: float = 60.0  # how often the supervisor lists the broker's topics for patterns
    # "all": each consumer reads every partition of its topic (one host); "group": the hosts sharing group_id share
    # the partitions through Kafka's consumer-group protocol (fleet mode, docs/fleet.md; needs s3.bucket)
    assignment: str = "all"
    commit_every: float = 5.0  # group mode: seconds between commits of the partitions' durable frontiers
    decode_workers: int | str = 0  # processes decoding beside each consumer (ztfd.ingest.decodepool); or "auto"

    @property
    def group_mode(self) -> bool:
        """Fleet mode: partitions shared with the group's other hosts, offsets committed once durable in S3."""
        return self.assignment == "group"


@dataclass(frozen=True)
class StampsConfig:
    enabled: bool = True
    workers: int = 4
    alerce_stamp_url: str = "https://avro.alerce.online"
    alerce_api_url: str = "https://api.alerce.online"
    timeout: float = 30.0
    max_attempts: int = 8
    previews: bool = True
    preview_renderer: str = "fast"
    retry_base: float = 2.0
    retry_max: float = 300.0
    unavailable_retry_base: float = 300.0
    unavailable_retry_max: float = 21600.0
    unavailable_give_up: float = 604800.0
    rate_limit: float = 10.0
    concurrency: int = 8
    lease_seconds: float = 120.0
    match_tolerance: float = 60.0
    ztf_provider: str = "alerce"  # where ZTF stamps come from (a ztfd.stamps.providers name) or none
    ztf_request: str = "get_avro"  # ALeRCE ZTF stamps: the whole packet in one request, or get_stamp per stamp
    detections_fresh: float = 600.0  # seconds a detections list serves the pool's other jobs of its object; 0: off
    max_stamp_bytes: int = 8 * 1024 * 1024  # a stamp's FITS, decompressed
    max_stamp_side: int = 512  # pixels per side of a stamp's image
    step_timeout: float = 60.0  # seconds a job's FITS checks, writes and preview may take together
    lsst_provider: str = "alerce"  # where LSST stamps come from: alerce, lasair or none
    alerce_lsst_url: str = "https://api-lsst.alerce.online"
    lasair_lsst_url: str = "https://lasair-lsst.lsst.ac.uk"


@dataclass(frozen=True)
class S3Config:
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str = ""
    region: str = ""
    interval: float = 7200.0
    concurrency: int = 16
    multipart_threshold: int = 64 * 1024 * 1024
    delete_local_after_days: float = 0.0
    max_attempts: int = 5
    lock_timeout: float = 600.0


@dataclass(frozen=True)
class SupervisorConfig:
    heartbeat_timeout: float = 120.0
    restart_backoff_max: float = 60.0
    stop_timeout: float = 30.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    max_bytes: int = 10 * 1024 * 1024
    backup_count: int = 5


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # host:port of the Prometheus endpoint; empty: no metrics process


@dataclass(frozen=True)
class ReportConfig:
    after_quiet: float = 3600.0  # seconds a night stays quiet before the daemon (re)writes its report; 0: never


@dataclass(frozen=True)
class StoreConfig:
    # Rejected messages received more than this many days ago are exported to files under data/ (synced like
    # every file there) and deleted from the store; 0: keep them in the store forever (docs/store.md).
    rejected_keep_days: float = 30.0


@dataclass(frozen=True)
class ArchiveConfig:
    enabled: bool = False  # the supervisor runs the dataset writer (``ztfd archive``) when true
    interval: float = 60.0  # seconds: every stored alert is in the Parquet dataset at most this much later
    compact_after: float = 3600.0  # seconds a night must be quiet before its part files are folded into one


@dataclass(frozen=True)
class Config:
    path: Path
    home: Path
    kafka: KafkaConfig
    stamps: StampsConfig = field(default_factory=StampsConfig)
    s3: S3Config = field(default_factory=S3Config)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)

    # The runtime layout under ``home``; everything a user touches is documented in docs/layout.md.
    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "ztfd.sqlite3"

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "ztfd.pid"

    def masked(self) -> dict[str, Any]:
        """The effective configuration as a dict, secrets replaced by ``***`` (for ``ztfd config``)."""
        raw = dataclasses.asdict(self)
        raw["path"], raw["home"] = str(self.path), str(self.home)
        raw["kafka"]["topics"] = list(self.kafka.topics)
        raw["kafka"]["options"] = {
            k: ("***" if is_secret(k) else v) for k, v in self.kafka.options.items()
        }
        return _without_url_secrets(raw)


def _without_url_secrets(value: Any) -> Any:
    """Every string in a nested configuration with the passwords of its URLs masked."""
    if isinstance(value, str):
        return mask_url_secrets(value)
    if isinstance(value, dict):
        return {k: _without_url_secrets(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_url_secrets(v) for v in value]
    return value


def is_secret(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in SECRET_WORDS)


# Section name -> dataclass; the top level holds only ``home``.
SECTIONS: dict[str, type] = {
    "kafka": KafkaConfig,
    "stamps": StampsConfig,
    "s3": S3Config,
    "supervisor": SupervisorConfig,
    "logging": LoggingConfig,
    "metrics": MetricsConfig,
    "report": ReportConfig,
    "store": StoreConfig,
    "archive": ArchiveConfig,
}
REQUIRED = {("kafka", "group_id"), ("kafka", "topics")}
# Keys whose value is one of a few words (compared case-insensitively for the log level).
CHOICES = {
    ("stamps", "ztf_request"): ("get_avro", "get_stamp"),
    ("stamps", "preview_renderer"): ("fast", "matplotlib"),
    ("stamps", "lsst_provider"): ("alerce", "lasair", "none"),
    ("kafka", "assignment"): ("all", "group"),
    ("logging", "level"): ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
}
# Base URLs of services: an http(s) URL, so that a typo fails at start and not at the first request.
URLS = {
    ("stamps", "alerce_stamp_url"), ("stamps", "alerce_api_url"), ("stamps", "alerce_lsst_url"),
    ("stamps", "lasair_lsst_url"),
}
MAX_DECODE_WORKERS = 64
HTTP_URL = re.compile(r"^https?://[^\s/?#]+(/\S*)?\Z")
POSITIVE = {
    ("kafka", "max_message_bytes"), ("kafka", "batch_size"), ("stamps", "workers"), ("stamps", "timeout"),
    ("stamps", "max_attempts"), ("stamps", "concurrency"), ("stamps", "lease_seconds"), ("s3", "interval"),
    ("stamps", "max_stamp_bytes"), ("stamps", "max_stamp_side"), ("stamps", "step_timeout"),
    ("s3", "concurrency"), ("s3", "multipart_threshold"), ("s3", "max_attempts"),
    ("supervisor", "heartbeat_timeout"), ("supervisor", "stop_timeout"),
    ("kafka", "idle_topic_seconds"), ("kafka", "topic_scan_seconds"), ("kafka", "commit_every"),
    ("archive", "interval"), ("archive", "compact_after"),
}


def default_paths() -> list[Path]:
    """Where a command looks for its configuration without ``--config`` or ``$ZTFD_CONFIG``, in order."""
    return [LOCAL_CONFIG, USER_CONFIG.expanduser()]


def resolve_path(explicit: str | os.PathLike[str] | None) -> Path:
    """``--config`` wins, then ``$ZTFD_CONFIG``, then ``./ztfd.toml``, then ``~/.config/ztfd/ztfd.toml``.

    Raises ``ConfigError`` (one line listing where it looked) when none is named and none of the defaults exists.
    """
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    candidates = default_paths()
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        looked = ", ".join([f"${ENV_CONFIG} (unset)", *(str(p) for p in candidates)])
        raise ConfigError(f"config: no configuration file: looked at {looked}; pass --config FILE")
    return found


def load(explicit: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read, override from the environment, and validate the configuration."""
    path = resolve_path(explicit).expanduser()
    environ = dict(os.environ if environ is None else environ)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config: file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    apply_environment(raw, environ)
    return build(raw, path.resolve())


def apply_environment(raw: dict[str, Any], environ: dict[str, str]) -> None:
    """Apply ``ZTFD_<SECTION>_<KEY>`` overrides in place (``ZTFD_HOME`` for ``home``).

    ``ZTFD_KAFKA_OPTIONS_<NAME>`` sets librdkafka option ``<name>`` with ``_`` read as ``.``, so secrets such as
    ``ZTFD_KAFKA_OPTIONS_SASL_PASSWORD`` can stay out of the file. Values are parsed as TOML where they can be
    (``true``, ``8``, ``["a", "b"]``) and taken as strings otherwise; a comma list is accepted for lists.
    """
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if rest == "home":
            raw["home"] = value
            continue
        if rest == "log_level":  # the short form of ZTFD_LOGGING_LEVEL, and the one that wins
            raw.setdefault("logging", {})["level"] = value
            continue
        if rest.startswith("kafka_options_"):
            option = rest[len("kafka_options_"):].replace("_", ".")
            raw.setdefault("kafka", {}).setdefault("options", {})[option] = value
            continue
        section, _, key = rest.partition("_")
        if section not in SECTIONS:
            continue  # not ours (e.g. ZTFD_PROCESS_NAME set by the supervisor)
        if key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise ConfigError(f"config: unknown key {section}.{key} (from environment variable {name})")
        raw.setdefault(section, {})[key] = _parse_env_value(value)


def _parse_env_value(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def build(raw: dict[str, Any], path: Path) -> Config:
    """Validate a parsed TOML document into a ``Config``; ``path`` anchors a relative ``home``."""
    for key in raw:
        if key != "home" and key not in SECTIONS:
            raise ConfigError(f"config: unknown key {key}")
    home_value = raw.get("home", ".")
    if not isinstance(home_value, str) or not home_value:
        raise ConfigError("config: home must be a non-empty string")
    home = Path(home_value).expanduser()
    if not home.is_absolute():
        home = (path.parent / home).resolve()
    sections = {name: _build_section(name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()}
    sections["kafka"] = _check_kafka(sections["kafka"], path)
    sections["kafka"] = _check_fleet(sections["kafka"], sections["s3"])
    return Config(path=path, home=home, **sections)


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config: {name} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"config: unknown key {name}.{key}")
    for section, key in REQUIRED:
        if section == name and key not in values:
            raise ConfigError(f"config: missing required key {name}.{key}")
    kwargs = {key: _check_type(name, key, fields[key], value) for key, value in values.items()}
    return cls(**kwargs)


def _check_topic(where: str, entry: str) -> None:
    """A topic name (it becomes a folder under data/) or a ``^`` pattern that compiles (``ztfd.ingest.topics``)."""
    from ztfd.ingest import topics

    if topics.is_pattern(entry):
        try:
            topics.compiled(entry)
        except re.error:
            raise ConfigError(f"config: {where} holds a pattern that is not a regular expression") from None
    elif not KAFKA_TOPIC.match(entry) or entry in {".", ".."}:
        raise ConfigError(f"config: {where} holds a name that is not a Kafka topic (letters, digits, . _ -)")


def _check_kafka(kafka: KafkaConfig, config_path: Path) -> KafkaConfig:
    """What needs several keys at once: each ``avro`` topic's schema file, the registry of ``confluent-avro``
    topics. Schema paths are made absolute (relative to the config file's folder) and must hold an Avro schema."""
    from ztfd.ingest import topics

    schemas = {}
    for entry, value in kafka.schemas.items():
        where = f"kafka.schemas.{entry}"
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config: {where} must name an .avsc file")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else (config_path.parent / path).resolve()
        _check_schema_file(where, path)
        schemas[entry] = str(path)
    for entry, name in kafka.formats.items():
        if name == "avro" and topics.lookup(schemas, entry) is None:
            raise ConfigError(f"config: kafka.formats.{entry} is avro but kafka.schemas names no schema for it")
        if name == "confluent-avro" and not kafka.schema_registry_url:
            raise ConfigError(f"config: kafka.formats.{entry} is confluent-avro but kafka.schema_registry_url is empty")
    url = kafka.schema_registry_url
    if url and not HTTP_URL.match(url):
        raise ConfigError("config: kafka.schema_registry_url must be an http:// or https:// URL")
    return dataclasses.replace(kafka, schemas=schemas)


def _check_fleet(kafka: KafkaConfig, s3: S3Config) -> KafkaConfig:
    """Group mode needs the bucket: it is the fleet's durable store, which offsets are committed after; and a prefix
    that is a folder, where the night report's reader (``reporting.fleet_night``) finds the archive."""
    kafka = dataclasses.replace(kafka, assignment=kafka.assignment.lower())
    if kafka.group_mode and not s3.bucket:
        raise ConfigError('config: s3.bucket is required with kafka.assignment = "group" (the fleet\'s durable store)')
    if kafka.group_mode and s3.prefix and not s3.prefix.endswith("/"):
        raise ConfigError('config: s3.prefix must end with "/" with kafka.assignment = "group" (the fleet\'s night '
                          'reports read the bucket\'s mirror of a home as a folder)')
    return kafka


def _check_decode_workers(where: str, value: Any) -> int | str:
    """A count of processes (0: decode in the consumer) or ``auto``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DECODE_WORKERS:
        raise ConfigError(f'config: {where} must be "auto" or an integer from 0 to {MAX_DECODE_WORKERS}')
    return value


def _check_schema_file(where: str, path: Path) -> None:
    from ztfd.sources import avro

    try:
        avro.schema_from_file(path)
    except FileNotFoundError:
        raise ConfigError(f"config: {where}: file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config: {where}: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"config: {where}: {path} is not an Avro schema ({exc})") from None


def _check_formats(where: str, formats: dict[str, Any]) -> None:
    """Every topic's format must name a source (``ztfd.sources``)."""
    from ztfd import sources

    sources.load_all()
    for topic, name in formats.items():
        if name not in sources.SOURCES:
            raise ConfigError(f"config: {where}.{topic} must name a message format "
                              f"({', '.join(sorted(sources.SOURCES))})")


def _check_type(section: str, key: str, fld: dataclasses.Field[Any], value: Any) -> Any:
    where = f"{section}.{key}"
    if (section, key) == ("kafka", "decode_workers"):
        return _check_decode_workers(where, value)
    kind = fld.type if isinstance(fld.type, str) else getattr(fld.type, "__name__", str(fld.type))
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config: {where} must be true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {where} must be an integer")
        result: Any = value
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config: {where} must be a number")
        result = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config: {where} must be a string")
        choices = CHOICES.get((section, key))
        if choices is not None and value.upper() not in {c.upper() for c in choices}:
            raise ConfigError(f"config: {where} must be one of {', '.join(choices)}")
        if (section, key) in URLS and not HTTP_URL.match(value):
            raise ConfigError(f"config: {where} must be an http:// or https:// URL")
        result = value
    elif kind == "tuple[str, ...]":
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"config: {where} must be a non-empty list of strings")
        if len(set(value)) != len(value):
            raise ConfigError(f"config: {where} lists a topic twice")
        for entry in value:
            _check_topic(where, entry)
        return tuple(value)
    elif kind == "dict[str, Any]":
        if not isinstance(value, dict):
            raise ConfigError(f"config: {where} must be a table")
        for option, option_value in value.items():
            if not isinstance(option_value, str | int | float | bool):
                raise ConfigError(f"config: {where}.{option} must be a string, number or boolean")
        if (section, key) in {("kafka", "formats"), ("kafka", "schemas")}:
            for entry in value:
                _check_topic(f"{where}.{entry}", entry)
        if (section, key) == ("kafka", "formats"):
            _check_formats(where, value)
        return dict(value)
    else:  # pragma: no cover - a new field type without a rule is a programming error
        raise AssertionError(f"no type rule for {where}: {kind}")
    if (section, key) in POSITIVE and result <= 0:
        raise ConfigError(f"config: {where} must be greater than 0")
    if isinstance(result, int | float) and result < 0:
        raise ConfigError(f"config: {where} must not be negative")
    if section == "kafka" and key == "group_id" and not result:
        raise ConfigError(f"config: {where} must not be empty")
    if section == "stamps" and key.endswith("_provider") and (section, key) not in CHOICES:
        from ztfd.stamps import providers

        names = providers.names_for(key.removesuffix("_provider"))
        if result not in (*names, *providers.NO_PROVIDER):
            raise ConfigError(f"config: {where} must be one of {', '.join((*names, 'none'))}")
    if (section, key) == ("metrics", "listen") and result:
        listen_address(result, where)
    return result


def listen_address(value: str, key: str = "metrics.listen") -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) as (host, port); ``ConfigError`` naming ``key`` otherwise."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in " /[]"):
        raise ConfigError(f"config: {key} must be host:port, e.g. 127.0.0.1:9464 (empty turns metrics off)")
    return host, int(port)

