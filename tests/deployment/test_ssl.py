"""SSL against a real server: a throwaway CA and server certificate, verify-full accepted or refused."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from db import DatabaseConfig, DatabaseConnection, DatabaseUnavailableError
from tools.postgres_server import (
    SUPERUSER,
    SUPERUSER_PASSWORD,
    PostgresUnavailableError,
    ThrowawayCluster,
    find_bindir,
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _authority(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ssl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThrowawayCluster, Path]]:
    """A cluster of the module's own that only accepts SSL, with a certificate for `localhost`."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail("SSL tests need PostgreSQL's binaries (initdb): install the postgresql package", pytrace=False)
    certificates = tmp_path_factory.mktemp("certificates")
    _authority(certificates, "root")
    _authority(certificates, "other-root")
    (certificates / "san.cnf").write_text("subjectAltName=DNS:localhost\n", encoding="utf-8")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr", cwd=certificates,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "root.crt", "-CAkey", "root.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.cnf", "-out", "server.crt", cwd=certificates,
    )  # fmt: skip
    cluster = ThrowawayCluster(bindir)
    for name in ("server.crt", "server.key"):
        target = cluster.root / name
        target.write_bytes((certificates / name).read_bytes())
        target.chmod(0o600)
        if cluster.run_as is not None:
            entry = pwd.getpwnam(cluster.run_as)
            os.chown(target, entry.pw_uid, entry.pw_gid)
    cluster.settings.update(
        ssl="on", ssl_cert_file=str(cluster.root / "server.crt"), ssl_key_file=str(cluster.root / "server.key")
    )
    try:
        cluster.start()
    except PostgresUnavailableError as exc:
        cluster.stop()
        pytest.fail(f"the SSL cluster did not start: {exc}", pytrace=False)
    try:
        yield cluster, certificates
    finally:
        DatabaseConnection.reset()
        cluster.stop()


def _config(cluster: ThrowawayCluster, host: str, root: Path) -> DatabaseConfig:
    return DatabaseConfig(
        type="postgresql",
        host=host,
        port=cluster.port,
        name="postgres",
        user=SUPERUSER,
        password=SUPERUSER_PASSWORD,
        sslmode="verify-full",
        sslrootcert=str(root),
        startup_timeout=0,
        connect_timeout=5,
    )


def test_verify_full_with_the_right_root_certificate_connects_over_ssl(
    ssl_server: tuple[ThrowawayCluster, Path],
) -> None:
    cluster, certificates = ssl_server
    connection = DatabaseConnection.initialize(_config(cluster, "localhost", certificates / "root.crt"))
    with connection.engine.connect() as conn:
        assert conn.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar_one() is True


@pytest.mark.parametrize(
    ("host", "root", "fragment"),
    [
        ("localhost", "other-root.crt", "certificate verify failed"),
        ("127.0.0.1", "root.crt", 'does not match host name "127.0.0.1"'),
        ("localhost", "missing.crt", "root certificate file"),
    ],
)
def test_a_wrong_root_certificate_or_host_name_is_refused_clearly(
    ssl_server: tuple[ThrowawayCluster, Path], host: str, root: str, fragment: str
) -> None:
    cluster, certificates = ssl_server
    with pytest.raises(DatabaseUnavailableError, match=fragment) as refused:
        DatabaseConnection.initialize(_config(cluster, host, certificates / root))
    assert SUPERUSER_PASSWORD not in str(refused.value)
    assert "cannot reach the database at postgresql+psycopg2://postgres:***@" in str(refused.value)
