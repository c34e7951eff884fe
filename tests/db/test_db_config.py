"""DatabaseConfig: precedence, layouts, URL building and validation. No database needed."""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy.engine import make_url

from db import DatabaseConfig, DatabaseConfigError, PoolConfig
from db.config import SETTINGS, load_base_dir

SECRET = "p@ss:w/rd%#?&= ü"


def nested(**database: Any) -> dict[str, Any]:
    return {"database": database}


def test_defaults_without_config_or_environment() -> None:
    config = DatabaseConfig.load({}, env={})
    assert config.type == "sqlite"
    assert config.backend == "sqlite"
    assert Path(config.sqlite_path) == Path("contexts") / "tasks.db"
    assert (config.host, config.port, config.name) == ("localhost", 5432, "coding_agent")
    assert config.user is None and config.password is None and config.url is None
    assert config.pool == PoolConfig(size=5, max_overflow=10, timeout=30, recycle=3600)
    assert config.sources["port"] == "default"


def test_canonical_yaml_layout() -> None:
    config = DatabaseConfig.load(
        nested(
            type="postgresql",
            postgresql={"host": "db", "port": 6543, "name": "agent", "user": "runner", "sslmode": "require"},
            pool={"size": 2, "max_overflow": 0, "timeout": 5, "recycle": -1},
        ),
        env={},
    )
    assert config.sqlalchemy_url.drivername == "postgresql+psycopg2"
    assert (config.host, config.port, config.name, config.user) == ("db", 6543, "agent", "runner")
    assert config.sqlalchemy_url.query["sslmode"] == "require"
    assert config.pool == PoolConfig(size=2, max_overflow=0, timeout=5, recycle=-1)
    assert config.sources["port"] == "database.postgresql.port (config.yaml)"


def test_flat_keys_are_accepted_and_nested_ones_win() -> None:
    config = DatabaseConfig.load(
        nested(type="postgresql", host="flat-host", port=1111, name="flat", postgresql={"host": "nested-host"}),
        env={},
    )
    assert config.host == "nested-host"
    assert config.port == 1111
    assert config.name == "flat"


SAMPLES = {
    # field: (environment text, YAML value, expected from the environment, expected from YAML)
    "type": ("postgresql", "sqlite", "postgresql", "sqlite"),
    "url": (
        "postgresql://e@h/env_db",
        "postgresql://y@h/yaml_db",
        "postgresql://e@h/env_db",
        "postgresql://y@h/yaml_db",
    ),
    "host": ("env-host", "yaml-host", "env-host", "yaml-host"),
    "port": ("7000", 7001, 7000, 7001),
    "name": ("env_db", "yaml_db", "env_db", "yaml_db"),
    "user": ("env_user", "yaml_user", "env_user", "yaml_user"),
    "password": ("env-secret", "yaml-secret", "env-secret", "yaml-secret"),
    "sslmode": ("verify-full", "disable", "verify-full", "disable"),
    "sslrootcert": ("/etc/env-ca.pem", "/etc/yaml-ca.pem", "/etc/env-ca.pem", "/etc/yaml-ca.pem"),
    "slow_query_ms": ("250", 0, 250, 0),
    "sqlite_path": ("/tmp/env.db", "/tmp/yaml.db", "/tmp/env.db", "/tmp/yaml.db"),
    "sqlite_backups_kept": ("7", 2, 7, 2),
    "pool_size": ("7", 8, 7, 8),
    "pool_max_overflow": ("3", 4, 3, 4),
    "pool_timeout": ("9", 11, 9, 11),
    "pool_recycle": ("120", 240, 120, 240),
    "connect_timeout": ("4", 6, 4, 6),
    "startup_timeout": ("1.5", 2.5, 1.5, 2.5),
    "retry_timeout": ("3.5", 4, 3.5, 4.0),
    "statement_timeout": ("12", 0.5, 12.0, 0.5),
    "lock_timeout": ("0", 3, 0.0, 3.0),
    "echo": ("true", False, True, False),
}


def _yaml_with(key: str, value: Any) -> dict[str, Any]:
    document: dict[str, Any] = {}
    node = document
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return document


def _field(config: DatabaseConfig, name: str) -> Any:
    if name.startswith("pool_"):
        return getattr(config.pool, name.removeprefix("pool_"))
    return getattr(config, name)


def test_every_setting_has_a_precedence_sample() -> None:
    assert {setting.field for setting in SETTINGS} == set(SAMPLES)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.field in SAMPLES], ids=lambda s: s.field)
def test_environment_beats_yaml_beats_default(setting: Any) -> None:
    env_value, yaml_value, from_env_expected, from_yaml_expected = SAMPLES[setting.field]
    document = _yaml_with(setting.yaml_keys[0], yaml_value)
    from_yaml = DatabaseConfig.load(document, env={})
    from_env = DatabaseConfig.load(document, env={setting.env: env_value})
    default = DatabaseConfig.load({}, env={})
    for config, expected in ((from_yaml, from_yaml_expected), (from_env, from_env_expected)):
        value = _field(config, setting.field)
        # Converted, not only equal as text: "7" must become 7, "true" True.
        assert (value, type(value)) == (expected, type(expected))
    assert _field(default, setting.field) != from_env_expected
    assert from_env.sources[setting.field] == f"{setting.env} (environment)"
    assert from_yaml.sources[setting.field] == f"{setting.yaml_keys[0]} (config.yaml)"


def test_empty_environment_variable_counts_as_unset() -> None:
    config = DatabaseConfig.load(nested(postgresql={"port": 6000}), env={"DATABASE_PORT": "", "DATABASE_TYPE": ""})
    assert config.port == 6000
    assert config.type == "sqlite"


def test_database_url_overrides_everything_and_names_psycopg2() -> None:
    env = {"DATABASE_URL": "postgresql://u:pw@dbhost:5433/tasks", "DATABASE_HOST": "ignored", "DATABASE_TYPE": "sqlite"}
    config = DatabaseConfig.load(nested(type="sqlite"), env=env)
    url = config.sqlalchemy_url
    assert config.type == "postgresql"
    assert (url.drivername, url.host, url.port, url.database) == ("postgresql+psycopg2", "dbhost", 5433, "tasks")


@pytest.mark.parametrize(
    ("text", "driver"),
    [
        ("postgres://u@h/d", "postgresql+psycopg2"),
        ("postgresql+psycopg2://u@h/d", "postgresql+psycopg2"),
        ("sqlite:////tmp/x.db", "sqlite"),
    ],
)
def test_url_schemes(text: str, driver: str) -> None:
    assert DatabaseConfig(url=text).sqlalchemy_url.drivername == driver


def test_sslmode_from_environment_reaches_a_url_without_one() -> None:
    config = DatabaseConfig.load({}, env={"DATABASE_URL": "postgresql://u@h/d", "DATABASE_SSLMODE": "require"})
    assert config.sqlalchemy_url.query["sslmode"] == "require"


def test_sqlite_path_joins_base_dir_unless_absolute_or_memory(tmp_path: Path) -> None:
    document = {"context_storage": {"base_dir": "state"}, "database": {"sqlite": {"path": "agent.db"}}}
    assert Path(DatabaseConfig.load(document, env={}).sqlite_path) == Path("state") / "agent.db"
    absolute = str(tmp_path / "abs.db")
    assert DatabaseConfig.load(document, env={"DATABASE_SQLITE_PATH": absolute}).sqlite_path == absolute
    memory = DatabaseConfig.load(document, env={"DATABASE_SQLITE_PATH": ":memory:"})
    assert memory.is_sqlite_memory
    assert memory.safe_url == "sqlite://"


def test_password_with_url_metacharacters_round_trips_and_is_masked() -> None:
    config = DatabaseConfig.load(
        nested(type="postgresql"), env={"DATABASE_USER": "us@r:/", "DATABASE_PASSWORD": SECRET}
    )
    rendered = config.sqlalchemy_url.render_as_string(hide_password=False)
    reparsed = make_url(rendered)
    assert reparsed.password == SECRET
    assert reparsed.username == "us@r:/"
    assert SECRET not in config.safe_url and "***" in config.safe_url
    assert SECRET not in repr(config)
    assert "p@ss" not in repr(config)


def test_a_url_naming_several_hosts_keeps_them_all_for_libpq_and_is_masked_as_any_url() -> None:
    text = (
        f"postgresql://agent:{quote(SECRET, safe='')}@/tasks?host=db-a:5432&host=db-b:5433"
        "&target_session_attrs=read-write"
    )
    config = DatabaseConfig.load({}, env={"DATABASE_URL": text})
    assert config.sqlalchemy_url.query["host"] == ("db-a:5432", "db-b:5433")
    assert config.sqlalchemy_url.query["target_session_attrs"] == "read-write"
    assert config.sqlalchemy_url.password == SECRET
    for shown in (config.safe_url, repr(config)):
        assert SECRET not in shown and quote(SECRET, safe="") not in shown
    assert "host=db-a%3A5432&host=db-b%3A5433" in config.safe_url


INVALID = [
    ({"DATABASE_TYPE": "oracle"}, {}, "DATABASE_TYPE (environment)", "unknown database type"),
    ({}, nested(type="mongo"), "database.type (config.yaml)", "unknown database type"),
    ({"DATABASE_PORT": "abc"}, {}, "DATABASE_PORT (environment)", "integer"),
    ({"DATABASE_PORT": "70000"}, {}, "DATABASE_PORT (environment)", "1..65535"),
    ({}, nested(postgresql={"port": 0}), "database.postgresql.port (config.yaml)", "1..65535"),
    ({}, nested(pool={"size": 0}), "database.pool.size (config.yaml)", ">= 1"),
    ({}, nested(pool={"size": "five"}), "database.pool.size (config.yaml)", "integer"),
    ({}, nested(pool={"size": 2.5}), "database.pool.size (config.yaml)", "integer"),
    ({}, nested(pool={"max_overflow": -1}), "database.pool.max_overflow (config.yaml)", ">= 0"),
    ({"DATABASE_POOL_TIMEOUT": "0"}, {}, "DATABASE_POOL_TIMEOUT (environment)", "> 0"),
    ({}, nested(pool={"recycle": 0}), "database.pool.recycle (config.yaml)", "-1 (off)"),
    ({"DATABASE_SSLMODE": "sometimes"}, {}, "DATABASE_SSLMODE (environment)", "verify-full"),
    ({"DATABASE_URL": "not a url"}, {}, "DATABASE_URL (environment)", "not a valid database URL"),
    ({"DATABASE_URL": "oracle2://u:pw@h/d"}, {}, "DATABASE_URL (environment)", "unknown database type"),
    ({"DATABASE_URL": "postgresql://u@h/d?sslmode=bad"}, {}, "DATABASE_URL (environment)", "sslmode"),
    ({"DATABASE_ECHO": "maybe"}, {}, "DATABASE_ECHO (environment)", "true or false"),
    ({}, nested(postgresql={"host": {"a": 1}}), "database.postgresql.host (config.yaml)", "single value"),
]


@pytest.mark.parametrize(("env", "document", "source", "problem"), INVALID)
def test_invalid_settings_name_the_setting_and_source(
    env: dict[str, str], document: dict[str, Any], source: str, problem: str
) -> None:
    with pytest.raises(DatabaseConfigError) as caught:
        DatabaseConfig.load(document, env=env)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(source)
    assert problem in str(caught.value)


def test_empty_database_name_in_yaml_is_refused_naming_the_key() -> None:
    with pytest.raises(DatabaseConfigError, match=r"^database\.postgresql\.name \(config\.yaml\): .*must not be empty"):
        DatabaseConfig.load(nested(type="postgresql", postgresql={"name": ""}), env={"DATABASE_NAME": ""})
    with pytest.raises(DatabaseConfigError, match="name must not be empty"):
        DatabaseConfig(type="postgresql", name="")
    # An empty optional value (config.yaml ships `user: ""`) and an empty environment variable stay unset.
    loaded = DatabaseConfig.load(nested(type="postgresql", postgresql={"user": ""}), env={"DATABASE_NAME": ""})
    assert (loaded.name, loaded.user) == ("coding_agent", None)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://user:{SECRET}@host/db",
        "postgresql://user:hunter2-secret@host:notaport/db",
        "://user:hunter2-secret@host/db",
    ],
)
def test_malformed_url_errors_never_quote_the_password(url: str) -> None:
    with pytest.raises(DatabaseConfigError) as caught:
        DatabaseConfig.load({}, env={"DATABASE_URL": url})
    message = str(caught.value)
    assert "DATABASE_URL" in message
    for fragment in ("hunter2", "secret", "w/rd", "p@ss", "ü"):
        assert fragment not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_password_in_yaml_works_but_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="db.config"):
        config = DatabaseConfig.load(nested(type="postgresql", postgresql={"password": SECRET}), env={})
    assert config.password == SECRET
    assert [record.getMessage() for record in caplog.records] == [
        "database.postgresql.password (config.yaml) holds a database password; "
        "set it in the DATABASE_PASSWORD environment variable instead"
    ]
    assert SECRET not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="db.config"):
        DatabaseConfig.load(nested(type="postgresql"), env={"DATABASE_PASSWORD": SECRET})
    assert caplog.text == ""


def test_password_inside_yaml_url_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="db.config"):
        DatabaseConfig.load(nested(url="postgresql://u:pw@h/d"), env={})
    assert "database.url (config.yaml)" in caplog.text


def test_load_reads_a_yaml_file_or_the_default_config_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("database:\n  type: postgresql\n  postgresql:\n    port: 6001\n", encoding="utf-8")
    assert DatabaseConfig.load(path, env={}).port == 6001
    assert DatabaseConfig.load(str(path), env={}).sources["port"] == "database.postgresql.port (agent.yaml)"
    monkeypatch.chdir(tmp_path)
    assert DatabaseConfig.load(env={}).type == "sqlite"
    (tmp_path / "config.yaml").write_text("database:\n  type: postgresql\n", encoding="utf-8")
    assert DatabaseConfig.load(env={}).type == "postgresql"


@pytest.mark.parametrize(
    ("content", "problem"), [("database: [unclosed", "not valid YAML"), ("- a\n- b\n", "top level must be a mapping")]
)
def test_unreadable_yaml_is_a_config_error(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatabaseConfigError, match=problem):
        DatabaseConfig.load(path, env={})
    with pytest.raises(DatabaseConfigError, match="cannot read"):
        DatabaseConfig.load(tmp_path / "missing.yaml", env={})


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ("database:\n  type: sqlite\n  url: x: y\n", " at line 3, column 9: mapping values are not allowed here"),
        ("database:\n  type: sqlite\n   name: x\n", " at line 3, column 8: mapping values are not allowed here"),
        ('database:\n  postgresql:\n    password: "hunter2\n', " at line 4, column 1: found unexpected end of stream"),
        # PyYAML quotes the offending character in this problem's text: only the position is given.
        ("database:\n\tpassword: hunter2\n", " at line 2, column 1"),
        # A character YAML does not allow at all: the reader's error has no position of that kind.
        ("database:\n  password: hun\x07ter2\n", ""),
    ],
)
def test_a_yaml_error_says_exactly_where_and_what_but_never_the_line(tmp_path: Path, content: str, where: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatabaseConfigError) as raised:
        DatabaseConfig.load(path, env={})
    assert str(raised.value) == f"{path}: not valid YAML{where}"


def test_config_is_frozen_and_compares_by_value() -> None:
    first = DatabaseConfig.load({}, env={"DATABASE_PORT": "5433"})
    second = DatabaseConfig.load(nested(postgresql={"port": 5433}), env={})
    assert first == second
    with pytest.raises(AttributeError):
        first.port = 1  # type: ignore[misc]


def test_the_context_base_dir_comes_from_the_yaml_or_the_default(tmp_path: Path) -> None:
    assert load_base_dir({"context_storage": {"base_dir": "/srv/agent"}}) == Path("/srv/agent")
    assert load_base_dir({"context_storage": {"base_dir": ""}}) == Path("contexts")
    assert load_base_dir({}) == Path("contexts")
    path = tmp_path / "agent.yaml"
    path.write_text("context_storage:\n  base_dir: work/tasks\n", encoding="utf-8")
    assert load_base_dir(path) == Path("work/tasks")
    assert load_base_dir(str(path)) == Path("work/tasks")


@pytest.mark.parametrize(
    ("text", "expected"),
    [(spelling, True) for spelling in ("1", "true", "yes", "on", " YES ")]
    + [(spelling, False) for spelling in ("0", "false", "no", "off", "Off")],
)
def test_every_spelling_of_a_switch(text: str, expected: bool) -> None:
    assert DatabaseConfig.load({}, env={"DATABASE_ECHO": text}).echo is expected


NUMBERS = [
    setting.env
    for setting in SETTINGS
    if type(setting.default) in (int, float) and setting.env != "DATABASE_PORT"  # the port has its own message
]


@pytest.mark.parametrize("variable", NUMBERS)
def test_a_number_that_is_not_one_names_its_variable_and_what_it_must_be(variable: str) -> None:
    kind = "a number of seconds" if isinstance(_setting(variable).default, float) else "an integer"
    with pytest.raises(DatabaseConfigError) as raised:
        DatabaseConfig.load({}, env={variable: "lots"})
    assert str(raised.value) == f"{variable} (environment): must be {kind}, got 'lots'"


def _setting(variable: str) -> Any:
    return next(setting for setting in SETTINGS if setting.env == variable)


def test_switches_and_odd_values_are_refused_with_their_source() -> None:
    with pytest.raises(DatabaseConfigError) as raised:
        DatabaseConfig.load({}, env={"DATABASE_ECHO": "maybe"})
    assert str(raised.value) == "DATABASE_ECHO (environment): must be true or false, got 'maybe'"
    with pytest.raises(DatabaseConfigError) as raised:
        DatabaseConfig.load(nested(pool={"size": [1, 2]}), env={})
    assert str(raised.value) == "database.pool.size (config.yaml): must be a single value, not a list"
    with pytest.raises(DatabaseConfigError) as raised:
        DatabaseConfig.load(nested(sqlite={"path": ""}), env={"DATABASE_SQLITE_PATH": ""})
    assert str(raised.value).endswith(": the SQLite path must not be empty")
    assert str(raised.value).startswith("database.sqlite.path")


def test_postgres_is_another_name_for_postgresql() -> None:
    assert DatabaseConfig.load({}, env={"DATABASE_TYPE": "Postgres"}).type == "postgresql"
    config = DatabaseConfig.load({}, env={"DATABASE_URL": "postgres+psycopg2://agent@db.example/tasks"})
    assert config.type == "postgresql"
    assert config.sqlalchemy_url.drivername == "postgresql+psycopg2"


def test_url_errors_say_what_a_url_must_look_like() -> None:
    with pytest.raises(DatabaseConfigError) as raised:
        DatabaseConfig.load({}, env={"DATABASE_URL": "::not a url::"})
    assert str(raised.value) == (
        "DATABASE_URL (environment): not a valid database URL; "
        "expected dialect[+driver]://user:password@host:port/name "
        "with special characters in the password percent-encoded"
    )
    with pytest.raises(DatabaseConfigError) as raised:
        DatabaseConfig.load({}, env={"DATABASE_URL": "postgresql://agent@db/tasks?sslmode=sometimes"})
    assert "unknown sslmode 'sometimes'; allowed: disable, allow, prefer, require, verify-ca, verify-full" in str(
        raised.value
    )


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("postgresql://agent@db/tasks", False),
        ("postgresql://agent@db/tasks?sslmode=require", False),
        ("postgresql://agent@db/tasks?PassWord=x", True),
        ("postgresql://agent:pw@db/tasks", True),
    ],
)
def test_only_a_url_holding_a_password_warns(caplog: pytest.LogCaptureFixture, url: str, warned: bool) -> None:
    with caplog.at_level(logging.WARNING, logger="db.config"):
        DatabaseConfig.load(nested(url=url), env={})
    assert ("holds a database password" in caplog.text) is warned


def test_the_base_dir_is_recorded_as_the_source_of_the_sqlite_path(tmp_path: Path) -> None:
    config = DatabaseConfig.load({"context_storage": {"base_dir": str(tmp_path)}}, env={})
    assert config.sqlite_path == str(tmp_path / "tasks.db")
    assert config.sources["base_dir"] == "context_storage.base_dir (config.yaml)"
    assert "base_dir" not in DatabaseConfig.load({}, env={}).sources
    assert DatabaseConfig.load({"context_storage": {"base_dir": ""}}, env={}).sqlite_path == str(
        Path("contexts") / "tasks.db"
    )


def test_a_yes_or_no_where_a_number_belongs_is_refused_as_such() -> None:
    with pytest.raises(DatabaseConfigError) as raised:
        DatabaseConfig.load(nested(pool={"size": True}), env={})
    assert str(raised.value) == "database.pool.size (config.yaml): must be an integer, got True"


BUILT_WRONG = [
    ({"type": "oracle"}, "type: unknown database type 'oracle'; allowed: sqlite, postgresql"),
    (
        {"sslmode": "sometimes"},
        "sslmode: unknown sslmode 'sometimes'; allowed: disable, allow, prefer, require, verify-ca, verify-full",
    ),
    ({"url": "not a url"}, "url: not a valid database URL; expected dialect[+driver]://"),
    ({"port": 0}, "port: must be an integer in 1..65535, got 0"),
    ({"port": 65536}, "port: must be an integer in 1..65535, got 65536"),
    ({"port": True}, "port: must be an integer in 1..65535, got True"),
    ({"port": "5432"}, "port: must be an integer in 1..65535, got '5432'"),
    ({"type": "postgresql", "name": ""}, "name: the database name must not be empty"),
    ({"type": "postgresql", "host": ""}, "host: the host must not be empty"),
    ({"sqlite_path": ""}, "sqlite_path: the SQLite path must not be empty"),
    ({"pool": PoolConfig(size=0)}, "pool_size: must be an integer >= 1, got 0"),
    ({"pool": PoolConfig(max_overflow=-1)}, "pool_max_overflow: must be an integer >= 0, got -1"),
    ({"pool": PoolConfig(timeout=0)}, "pool_timeout: must be an integer > 0, got 0"),
    ({"pool": PoolConfig(recycle=0)}, "pool_recycle: must be -1 (off) or an integer > 0, got 0"),
    ({"pool": PoolConfig(recycle=True)}, "pool_recycle: must be -1 (off) or an integer > 0, got True"),
    ({"connect_timeout": 0}, "connect_timeout: must be an integer > 0, got 0"),
    ({"connect_timeout": True}, "connect_timeout: must be an integer > 0, got True"),
    ({"sqlite_backups_kept": 0}, "sqlite_backups_kept: must be an integer >= 1, got 0"),
    ({"slow_query_ms": -1}, "slow_query_ms: must be an integer >= 0 (0 logs every statement), got -1"),
    ({"startup_timeout": float("inf")}, "startup_timeout: must be a finite number of seconds >= 0, got inf"),
    ({"retry_timeout": -0.5}, "retry_timeout: must be a finite number of seconds >= 0, got -0.5"),
    ({"statement_timeout": "30"}, "statement_timeout: must be a finite number of seconds >= 0, got '30'"),
    ({"lock_timeout": False}, "lock_timeout: must be a finite number of seconds >= 0, got False"),
]


@pytest.mark.parametrize(("fields", "message"), BUILT_WRONG, ids=[str(fields) for fields, _ in BUILT_WRONG])
def test_a_config_built_in_code_is_checked_and_names_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(DatabaseConfigError) as caught:
        DatabaseConfig(**fields)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    "fields",
    [
        {"port": 1},
        {"port": 65535},
        {"type": "sqlite", "name": "", "host": ""},
        {"type": "postgresql", "sqlite_path": ""},
        {"url": "sqlite:///elsewhere.db", "sqlite_path": ""},
        {"pool": PoolConfig(size=1, max_overflow=0, timeout=1, recycle=1)},
        {"pool": PoolConfig(recycle=-1)},
        {"connect_timeout": 1, "sqlite_backups_kept": 1, "slow_query_ms": 0},
        {"startup_timeout": 0, "retry_timeout": 0.0, "statement_timeout": 1e9, "lock_timeout": 0},
    ],
    ids=str,
)
def test_the_edges_of_each_range_are_accepted(fields: dict[str, Any]) -> None:
    config = DatabaseConfig(**fields)
    for name, value in fields.items():
        assert getattr(config, name) == value


def test_a_ca_file_reaches_a_postgresql_url_that_names_none() -> None:
    config = DatabaseConfig(url="postgresql://u@h/db", sslmode="verify-full", sslrootcert="/etc/ca.pem")
    assert dict(config.sqlalchemy_url.query) == {"sslmode": "verify-full", "sslrootcert": "/etc/ca.pem"}
    named = DatabaseConfig(url="postgresql://u@h/db?sslrootcert=/own.pem", sslrootcert="/etc/ca.pem")
    assert dict(named.sqlalchemy_url.query) == {"sslrootcert": "/own.pem"}


def test_without_an_env_argument_the_process_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_PORT", "6543")
    config = DatabaseConfig.load({})
    assert (config.port, config.sources["port"]) == (6543, "DATABASE_PORT (environment)")


@pytest.mark.parametrize(
    ("document", "source", "kind"),
    [
        (nested(postgresql={"password": 83}), "database.postgresql.password", "int"),  # `password: 0123`
        (nested(password=True), "database.password", "bool"),  # `password: yes`
        (nested(postgresql={"user": 1000}), "database.postgresql.user", "int"),
        (nested(postgresql={"name": date(2024, 1, 2)}), "database.postgresql.name", "date"),
        (nested(postgresql={"host": 10.5}), "database.postgresql.host", "float"),
        (nested(sqlite={"path": 7}), "database.sqlite.path", "int"),
        (nested(type=1), "database.type", "int"),
    ],
)
def test_a_yaml_value_that_is_not_text_where_text_belongs_is_refused_unseen(
    document: dict[str, Any], source: str, kind: str
) -> None:
    with pytest.raises(DatabaseConfigError) as caught:
        DatabaseConfig.load(document, env={})
    assert str(caught.value) == f"{source} (config.yaml): must be text, not a YAML {kind}; put the value in quotes"


def test_a_path_given_in_code_is_taken_as_its_text(tmp_path: Path) -> None:
    document = nested(sqlite={"path": tmp_path / "tasks.db"}, sslrootcert=tmp_path / "ca.pem")
    config = DatabaseConfig.load(document, env={})
    assert (config.sqlite_path, config.sslrootcert) == (str(tmp_path / "tasks.db"), str(tmp_path / "ca.pem"))


def test_numbers_and_switches_may_be_written_as_text_or_not() -> None:
    config = DatabaseConfig.load(
        nested(postgresql={"port": "6543", "user": "1000"}, pool={"size": 7.0}, echo="on", startup_timeout=2), env={}
    )
    assert (config.port, config.user, config.pool.size, config.echo, config.startup_timeout) == (
        6543,
        "1000",
        7,
        True,
        2.0,
    )
