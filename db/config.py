"""Database settings: environment variable > config.yaml > default, resolved once into a frozen object."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import NoSuchModuleError

from db.errors import DatabaseConfigError
from db.redaction import MASK

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE = Path("config.yaml")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SERVER_TYPES = ("sqlite", "postgresql")
MEMORY = ":memory:"
DEFAULT_SOURCE = "default"
# Query parameters of a URL that hold secrets: libpq takes `password` and `sslpassword` there too.
SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})


@dataclass(frozen=True)
class Setting:
    """One configurable value: its field, environment variable, YAML keys (preferred first) and default."""

    field: str
    env: str
    yaml_keys: tuple[str, ...]
    default: Any
    secret: bool = False

    @property
    def text(self) -> bool:
        """Taken as written. YAML reads `password: 0123` as the number 83, so a number or a switch here is
        refused rather than turned back into text."""
        return self.default is None or isinstance(self.default, str)


SETTINGS: tuple[Setting, ...] = (
    Setting("type", "DATABASE_TYPE", ("database.type",), "sqlite"),
    Setting("url", "DATABASE_URL", ("database.url",), None, secret=True),
    Setting("host", "DATABASE_HOST", ("database.postgresql.host", "database.host"), "localhost"),
    Setting("port", "DATABASE_PORT", ("database.postgresql.port", "database.port"), 5432),
    Setting("name", "DATABASE_NAME", ("database.postgresql.name", "database.name"), "coding_agent"),
    Setting("user", "DATABASE_USER", ("database.postgresql.user", "database.user"), None),
    Setting("password", "DATABASE_PASSWORD", ("database.postgresql.password", "database.password"), None, secret=True),
    Setting("sslmode", "DATABASE_SSLMODE", ("database.postgresql.sslmode", "database.sslmode"), None),
    Setting("sslrootcert", "DATABASE_SSLROOTCERT", ("database.postgresql.sslrootcert", "database.sslrootcert"), None),
    Setting("sqlite_path", "DATABASE_SQLITE_PATH", ("database.sqlite.path",), "tasks.db"),
    Setting("sqlite_backups_kept", "DATABASE_SQLITE_BACKUPS_KEPT", ("database.sqlite.backups_kept",), 3),
    Setting("pool_size", "DATABASE_POOL_SIZE", ("database.pool.size",), 5),
    Setting("pool_max_overflow", "DATABASE_POOL_MAX_OVERFLOW", ("database.pool.max_overflow",), 10),
    Setting("pool_timeout", "DATABASE_POOL_TIMEOUT", ("database.pool.timeout",), 30),
    Setting("pool_recycle", "DATABASE_POOL_RECYCLE", ("database.pool.recycle",), 3600),
    Setting("connect_timeout", "DATABASE_CONNECT_TIMEOUT", ("database.connect_timeout",), 10),
    Setting("startup_timeout", "DATABASE_STARTUP_TIMEOUT", ("database.startup_timeout",), 30.0),
    Setting("retry_timeout", "DATABASE_RETRY_TIMEOUT", ("database.retry_timeout",), 10.0),
    Setting("slow_query_ms", "DATABASE_SLOW_QUERY_MS", ("database.slow_query_ms",), 500),
    Setting("statement_timeout", "DATABASE_STATEMENT_TIMEOUT", ("database.statement_timeout",), 30.0),
    Setting("lock_timeout", "DATABASE_LOCK_TIMEOUT", ("database.lock_timeout",), 5.0),
    Setting("echo", "DATABASE_ECHO", ("database.echo",), False),
)
BASE_DIR_KEY = "context_storage.base_dir"
DEFAULT_BASE_DIR = "contexts"
INHERITANCE_DAYS_KEY = "context_inheritance.context_expiry_days"
DEFAULT_INHERITANCE_DAYS = 90.0


@dataclass(frozen=True)
class PoolConfig:
    """Connection pool sizing; used for server databases only."""

    size: int = 5
    max_overflow: int = 10
    timeout: int = 30
    recycle: int = 3600


@dataclass(frozen=True, repr=False)
class DatabaseConfig:
    """Where the task table lives and how to reach it.

    `sources` maps each field to where its value came from (an environment variable, a config.yaml key or
    the default); errors use it to name the setting at fault.
    """

    type: str = "sqlite"
    host: str = "localhost"
    port: int = 5432
    name: str = "coding_agent"
    user: str | None = None
    password: str | None = None
    sslmode: str | None = None
    sslrootcert: str | None = None
    url: str | None = None
    sqlite_path: str = str(Path(DEFAULT_BASE_DIR) / "tasks.db")
    sqlite_backups_kept: int = 3
    pool: PoolConfig = field(default_factory=PoolConfig)
    echo: bool = False
    connect_timeout: int = 10
    startup_timeout: float = 30.0
    retry_timeout: float = 10.0
    slow_query_ms: int = 500
    statement_timeout: float = 30.0
    lock_timeout: float = 5.0
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.url is not None:
            object.__setattr__(self, "type", _parse_url(self.url, self._label("url")).get_backend_name())
        elif self.type not in SERVER_TYPES:
            self._fail("type", f"unknown database type {self.type!r}; allowed: {', '.join(SERVER_TYPES)}")
        if self.sslmode is not None and self.sslmode not in SSL_MODES:
            self._fail("sslmode", f"unknown sslmode {self.sslmode!r}; allowed: {', '.join(SSL_MODES)}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            self._fail("port", f"must be an integer in 1..65535, got {self.port!r}")
        if self.type == "postgresql" and self.url is None:
            if not self.name:
                self._fail("name", "the database name must not be empty")
            if not self.host:
                self._fail("host", "the host must not be empty")
        if self.type == "sqlite" and self.url is None and not self.sqlite_path:
            self._fail("sqlite_path", "the SQLite path must not be empty")
        for name, low, what in (
            ("size", 1, ">= 1"),
            ("max_overflow", 0, ">= 0"),
            ("timeout", 1, "> 0"),
        ):
            _check_int(getattr(self.pool, name), low, self._label(f"pool_{name}"), what)
        recycle = self.pool.recycle
        if isinstance(recycle, bool) or not isinstance(recycle, int) or not (recycle == -1 or recycle > 0):
            self._fail("pool_recycle", f"must be -1 (off) or an integer > 0, got {recycle!r}")
        _check_int(self.connect_timeout, 1, self._label("connect_timeout"), "> 0")
        _check_int(self.sqlite_backups_kept, 1, self._label("sqlite_backups_kept"), ">= 1")
        _check_int(self.slow_query_ms, 0, self._label("slow_query_ms"), ">= 0 (0 logs every statement)")
        for name in ("startup_timeout", "retry_timeout", "statement_timeout", "lock_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                self._fail(name, f"must be a finite number of seconds >= 0, got {value!r}")

    def _label(self, name: str) -> str:
        return self.sources.get(name, name)

    def _fail(self, name: str, problem: str) -> None:
        raise DatabaseConfigError(f"{self._label(name)}: {problem}")

    @classmethod
    def load(
        cls, config: Mapping[str, Any] | str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> DatabaseConfig:
        """Resolve every setting from `env` (default `os.environ`), then `config`, then the defaults.

        `config` is the parsed config.yaml, a path to a YAML file, or None for ./config.yaml when it exists.
        """
        document, file_label = _read_config(config)
        resolver = _Resolver(os.environ if env is None else env, document, file_label)
        values = {setting.field: resolver.resolve(setting) for setting in SETTINGS}
        sources = dict(resolver.sources)
        base_dir, base_source = resolver.lookup(BASE_DIR_KEY)
        sqlite_path = str(values["sqlite_path"])
        if not sqlite_path.strip():
            raise DatabaseConfigError(f"{sources['sqlite_path']}: the SQLite path must not be empty")
        if sqlite_path != MEMORY and not Path(sqlite_path).is_absolute():
            sqlite_path = str(Path(DEFAULT_BASE_DIR if base_dir in (None, "") else str(base_dir)) / sqlite_path)
            if base_source is not None:
                sources["base_dir"] = base_source
        if sources["password"] != DEFAULT_SOURCE or _url_has_password(values["url"], sources["url"]):
            resolver.warn_on_yaml_secret(("password", "url"), values)
        return cls(
            type=_normalise_type(values["type"]),
            host=str(values["host"]),
            port=_to_int(values["port"], sources["port"]),
            name=str(values["name"]),
            user=values["user"],
            password=values["password"],
            sslmode=values["sslmode"],
            sslrootcert=values["sslrootcert"],
            url=values["url"],
            sqlite_path=sqlite_path,
            sqlite_backups_kept=_to_int(values["sqlite_backups_kept"], sources["sqlite_backups_kept"]),
            pool=PoolConfig(
                size=_to_int(values["pool_size"], sources["pool_size"]),
                max_overflow=_to_int(values["pool_max_overflow"], sources["pool_max_overflow"]),
                timeout=_to_int(values["pool_timeout"], sources["pool_timeout"]),
                recycle=_to_int(values["pool_recycle"], sources["pool_recycle"]),
            ),
            echo=_to_bool(values["echo"], sources["echo"]),
            connect_timeout=_to_int(values["connect_timeout"], sources["connect_timeout"]),
            startup_timeout=_to_float(values["startup_timeout"], sources["startup_timeout"]),
            retry_timeout=_to_float(values["retry_timeout"], sources["retry_timeout"]),
            slow_query_ms=_to_int(values["slow_query_ms"], sources["slow_query_ms"]),
            statement_timeout=_to_float(values["statement_timeout"], sources["statement_timeout"]),
            lock_timeout=_to_float(values["lock_timeout"], sources["lock_timeout"]),
            sources=sources,
        )

    @cached_property
    def sqlalchemy_url(self) -> URL:
        """The URL handed to `create_engine`, built with `URL.create` so any password works."""
        if self.url is not None:
            return _parse_url(self.url, self._label("url"), self.sslmode, self.sslrootcert)
        if self.type == "sqlite":
            return URL.create("sqlite", database=None if self.sqlite_path == MEMORY else self.sqlite_path)
        return URL.create(
            "postgresql+psycopg2",
            username=self.user or None,
            password=self.password or None,
            host=self.host,
            port=self.port,
            database=self.name,
            query={
                key: value for key, value in (("sslmode", self.sslmode), ("sslrootcert", self.sslrootcert)) if value
            },
        )

    @property
    def safe_url(self) -> str:
        """The URL as text with the password, and any secret in its query, replaced by `***`."""
        return mask_url(self.sqlalchemy_url)

    @property
    def backend(self) -> str:
        """The SQLAlchemy backend name: `sqlite`, `postgresql`, ..."""
        return self.sqlalchemy_url.get_backend_name()

    @property
    def is_sqlite_memory(self) -> bool:
        """True for an in-memory SQLite database, which lives and dies with its connection."""
        return self.backend == "sqlite" and self.sqlalchemy_url.database in (None, "", MEMORY)

    def __repr__(self) -> str:
        return f"DatabaseConfig(backend={self.backend!r}, url={self.safe_url!r}, pool={self.pool!r})"


def load_base_dir(config: Mapping[str, Any] | str | os.PathLike[str] | None = None) -> Path:
    """`context_storage.base_dir` of config.yaml (default `contexts`): where task directories and, by default,
    the SQLite file live."""
    document, file_label = _read_config(config)
    value, _ = _Resolver({}, document, file_label).lookup(BASE_DIR_KEY)
    return Path(DEFAULT_BASE_DIR if value in (None, "") else str(value))


def load_inheritance_days(config: Mapping[str, Any] | str | os.PathLike[str] | None = None) -> float:
    """`context_inheritance.context_expiry_days` of config.yaml (default 90): how long a finished run stays one
    that a new run of its issue or merge request inherits from."""
    document, file_label = _read_config(config)
    value, source = _Resolver({}, document, file_label).lookup(INHERITANCE_DAYS_KEY)
    if value in (None, ""):
        return DEFAULT_INHERITANCE_DAYS
    try:
        days = float(value) if not isinstance(value, bool) and isinstance(value, int | float | str) else -1.0
    except ValueError:
        days = -1.0
    if not 0 <= days < float("inf"):
        raise DatabaseConfigError(f"{source}: must be a number of days >= 0, got {str(value)[:64]!r}")
    return days


class _Resolver:
    """Looks a setting up in the environment, then the YAML document, recording where each value came from."""

    def __init__(self, env: Mapping[str, str], document: Mapping[str, Any], file_label: str) -> None:
        self.env = env
        self.document = document
        self.file_label = file_label
        self.sources: dict[str, str] = {}

    def lookup(self, dotted: str) -> tuple[Any, str | None]:
        node: Any = self.document
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None, None
            node = node[part]
        return node, f"{dotted} ({self.file_label})"

    def resolve(self, setting: Setting) -> Any:
        # An empty string counts as unset: docker-compose's ${VAR:-} produces those.
        value = self.env.get(setting.env)
        if value not in (None, ""):
            self.sources[setting.field] = f"{setting.env} (environment)"
            return value
        for key in setting.yaml_keys:
            value, source = self.lookup(key)
            # An empty YAML value leaves an optional setting unset; a required one keeps it, to be refused.
            if source is not None and value is not None and (value != "" or setting.default is not None):
                if isinstance(value, Mapping | list):
                    raise DatabaseConfigError(f"{source}: must be a single value, not a {type(value).__name__}")
                if setting.text and isinstance(value, os.PathLike):
                    value = os.fspath(value)
                if setting.text and not isinstance(value, str):
                    # The value itself is never shown: it may be a password.
                    raise DatabaseConfigError(
                        f"{source}: must be text, not a YAML {type(value).__name__}; put the value in quotes"
                    )
                self.sources[setting.field] = source
                return value
        self.sources[setting.field] = DEFAULT_SOURCE
        return setting.default

    def warn_on_yaml_secret(self, fields: tuple[str, ...], values: Mapping[str, Any]) -> None:
        for name in fields:
            source = self.sources[name]
            if values[name] and source.endswith(f"({self.file_label})"):
                logger.warning(
                    "%s holds a database password; set it in the DATABASE_PASSWORD environment variable instead",
                    source,
                )


def _read_config(config: Mapping[str, Any] | str | os.PathLike[str] | None) -> tuple[Mapping[str, Any], str]:
    if isinstance(config, Mapping):
        return config, "config.yaml"
    path = DEFAULT_CONFIG_FILE if config is None else Path(config)
    if config is None and not path.exists():
        return {}, "config.yaml"
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatabaseConfigError(f"{path}: cannot read the configuration file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise DatabaseConfigError(f"{path}: not valid YAML{_yaml_position(exc)}") from None
    if document is None:
        return {}, path.name
    if not isinstance(document, Mapping):
        raise DatabaseConfigError(f"{path}: the top level must be a mapping of sections")
    return document, path.name


def _yaml_position(exc: yaml.YAMLError) -> str:
    """Where the YAML error is and what kind it is; never the text of the line, which may hold a password."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    # PyYAML's problem texts are fixed phrases, except those that quote the offending character.
    what = f": {problem}" if isinstance(problem, str) and "'" not in problem and '"' not in problem else ""
    return where + what


def _parse_url(text: str, label: str, sslmode: str | None = None, sslrootcert: str | None = None) -> URL:
    # make_url's own ValueError can quote pieces of the password: never chain or repeat it.
    try:
        url = make_url(text)
    except Exception:
        raise DatabaseConfigError(
            f"{label}: not a valid database URL; expected dialect[+driver]://user:password@host:port/name "
            "with special characters in the password percent-encoded"
        ) from None
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgres", "postgresql"):
        url = url.set(drivername=f"postgresql+{driver or 'psycopg2'}")
    try:
        url.get_dialect()
    except NoSuchModuleError:
        raise DatabaseConfigError(
            f"{label}: unknown database type {url.drivername!r}; use sqlite:///PATH or postgresql://..."
        ) from None
    _check_ports(url, label)
    query_sslmode = url.query.get("sslmode")
    if isinstance(query_sslmode, str) and query_sslmode not in SSL_MODES:
        raise DatabaseConfigError(f"{label}: unknown sslmode {query_sslmode!r}; allowed: {', '.join(SSL_MODES)}")
    if url.get_backend_name() == "postgresql":
        extra = {key: value for key, value in (("sslmode", sslmode), ("sslrootcert", sslrootcert)) if value}
        url = url.update_query_dict({key: value for key, value in extra.items() if key not in url.query})
    return url


def _check_ports(url: URL, label: str) -> None:
    """The URL's port, and those of the hosts and ports its query lists, are TCP ports (1..65535)."""
    ports: list[object] = [url.port] if url.port is not None else []
    for key in ("host", "port"):
        values = url.query.get(key) or ()
        for value in (values,) if isinstance(values, str) else values:
            text = value.rpartition(":")[2] if key == "host" and ":" in value and not value.endswith("]") else value
            if key == "port" or text != value:
                ports.extend(text.split(","))
    for port in ports:
        number = (
            int(port) if isinstance(port, int) or (isinstance(port, str) and port.isascii() and port.isdigit()) else 0
        )
        if not 1 <= number <= 65535:
            raise DatabaseConfigError(f"{label}: a port must be a number in 1..65535, got {str(port)[:16]!r}")


def mask_url(url: URL) -> str:
    """`url` as text with its password and secret query parameters shown as `***`."""
    rendered = url.render_as_string(hide_password=True)
    return _SECRET_QUERY_VALUE.sub(rf"\g<1>{MASK}", rendered)


_SECRET_QUERY_VALUE = re.compile(rf"([?&](?:{'|'.join(sorted(SECRET_QUERY_KEYS))})=)[^&]*", re.IGNORECASE)


def _normalise_type(value: Any) -> str:
    text = str(value).strip().lower()
    return "postgresql" if text == "postgres" else text


def _url_has_password(url: Any, label: str) -> bool:
    if not url:
        return False
    parsed = _parse_url(str(url), label)
    return parsed.password is not None or any(key.lower() in SECRET_QUERY_KEYS for key in parsed.query)


def _convert(value: Any, source: str, kind: Callable[[Any], Any], what: str) -> Any:
    if isinstance(value, bool):
        raise DatabaseConfigError(f"{source}: must be {what}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise DatabaseConfigError(f"{source}: must be {what}, got {value!r}") from None


def _to_int(value: Any, source: str) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise DatabaseConfigError(f"{source}: must be an integer, got {value!r}")
    result: int = _convert(value, source, int, "an integer")
    return result


def _to_float(value: Any, source: str) -> float:
    result: float = _convert(value, source, float, "a number of seconds")
    return result


def _to_bool(value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise DatabaseConfigError(f"{source}: must be true or false, got {value!r}")


def _check_int(value: Any, low: int, label: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DatabaseConfigError(f"{label}: must be an integer {what}, got {value!r}")
