"""Secrets in the words agents print are masked, in every form tools print them, and nothing else is."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import main
from db import DatabaseConfig, DatabaseConnection, TaskRepository
from db.redaction import redact_secrets
from db.schema import upgrade_schema

SECRET = "hunter2-Zq9"

# (what a tool printed, what may be shown of it)
PRINTED = [
    # environment dumps and shell lines
    (f"PGPASSWORD={SECRET} psql -h db", "PGPASSWORD=*** psql -h db"),
    (f"DATABASE_PASSWORD={SECRET}\nHOME=/root", "DATABASE_PASSWORD=***\nHOME=/root"),
    (f"POSTGRES_PASSWORD='{SECRET} x' docker run", "POSTGRES_PASSWORD='***' docker run"),
    (f'MYSQL_ROOT_PASSWORD="{SECRET}"', 'MYSQL_ROOT_PASSWORD="***"'),
    (f"export PGPASSWORD={SECRET}; psql", "export PGPASSWORD=***; psql"),
    (f"GITHUB_TOKEN={SECRET}", "GITHUB_TOKEN=***"),
    (f"OPENAI_API_KEY={SECRET}", "OPENAI_API_KEY=***"),
    (f"AWS_SECRET_ACCESS_KEY={SECRET}/x+y", "AWS_SECRET_ACCESS_KEY=***"),
    (f"password = {SECRET}", "password = ***"),
    # YAML
    (f"password: {SECRET}", "password: ***"),
    (f"database:\n  password: {SECRET} with spaces\n  user: bob", "database:\n  password: ***\n  user: bob"),
    (f"  client_secret: '{SECRET}'", "  client_secret: '***'"),
    # JSON and Python reprs
    (f'{{"password": "{SECRET}", "user": "bob"}}', '{"password": "***", "user": "bob"}'),
    (f"{{'password': '{SECRET}'}}", "{'password': '***'}"),
    (f'{{"api_key":"{SECRET}"}}', '{"api_key":"***"}'),
    # libpq connection strings
    (f"host=db password={SECRET} dbname=x", "host=db password=*** dbname=x"),
    (f"host=db password='{SECRET} x' dbname=x", "host=db password='***' dbname=x"),
    (f"host=db sslpassword={SECRET}", "host=db sslpassword=***"),
    # URLs, with and without a user
    (f"postgresql+psycopg2://owner:{SECRET}@host:5432/name", "postgresql+psycopg2://owner:***@host:5432/name"),
    (f"postgresql://owner:{SECRET}@x@host/name", "postgresql://owner:***@host/name"),
    (f"https://{SECRET}@github.com/acme/web.git", "https://***@github.com/acme/web.git"),
    (f"https://x-access-token:{SECRET}@github.com/acme/web", "https://x-access-token:***@github.com/acme/web"),
    (f"postgresql://u@/db?host=a:5432&password={SECRET}", "postgresql://u@/db?host=a:5432&password=***"),
    # SQL, headers, tokens that say what they are
    (f"CREATE ROLE x PASSWORD '{SECRET}'", "CREATE ROLE x PASSWORD '***'"),
    (f"curl -H 'Authorization: Bearer {SECRET}'", "curl -H 'Authorization: Bearer ***'"),
    ("push failed with ghp_abcdefghijklmnopqrstuvwxyz0123456789", "push failed with ***"),
    ("glpat-abcdefghijklmnopqrstu rejected", "*** rejected"),
    # .netrc, command lines, headers
    (f"machine github.com login u password {SECRET}", "machine github.com login u password ***"),
    (f"machine github.com\n  login u\n  password {SECRET}", "machine github.com\n  login u\n  password ***"),
    (f"pg_dump --password {SECRET} db", "pg_dump --password *** db"),
    (f"tool --api-key={SECRET} run", "tool --api-key=*** run"),
    (f"curl -u user:{SECRET} https://x", "curl -u user:*** https://x"),
    (f"curl --user user:{SECRET} https://x", "curl --user user:*** https://x"),
    (f"mysql -p{SECRET} -u root", "mysql -p*** -u root"),
    (f"sshpass -p {SECRET} ssh host", "sshpass -p *** ssh host"),
    (f"Cookie: session={SECRET}", "Cookie: ***"),
    (f"Proxy-Authorization: Basic {SECRET}", "Proxy-Authorization: Basic ***"),
    # more places a secret hides
    (
        f"-----BEGIN RSA PRIVATE KEY-----\nMIIE{SECRET}\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN RSA PRIVATE KEY-----***-----END RSA PRIVATE KEY-----",
    ),
    (f"AccountName=x;AccountKey={SECRET}==;EndpointSuffix=core", "AccountName=x;AccountKey=***;EndpointSuffix=core"),
    (
        f"https://acct.blob.core.windows.net/c?sv=2020&sig={SECRET}",
        "https://acct.blob.core.windows.net/c?sv=2020&sig=***",
    ),
    (f"<password>{SECRET}</password>", "<password>***</password>"),
    (f'<add key="Password" value="{SECRET}"/>', '<add key="Password" value="***"/>'),
    (f"CREATE USER x IDENTIFIED BY '{SECRET}'", "CREATE USER x IDENTIFIED BY '***'"),
    (f"DB_PASS={SECRET}", "DB_PASS=***"),
    (f"Server=x;User Id=u;Pwd={SECRET};", "Server=x;User Id=u;Pwd=***;"),
    (f":password => '{SECRET}'", ":password => '***'"),
    (f'failed: password="{SECRET} (cut short', 'failed: password="***'),
    (f"password=***{SECRET}", "password=***"),
    (f"password: |\n  {SECRET}\n  more\nuser: bob", "password: ***\n  ***\n  ***\nuser: bob"),
    (f"password:\n  {SECRET}\nuser: bob", "password:\n  ***\nuser: bob"),
    (f"postgres://user:{SECRET}/x@host/db", "postgres://user:***@host/db"),
    (f"https%3A%2F%2Fuser%3A{SECRET}%40host", "https%3A%2F%2Fuser%3A***%40host"),
    ("key AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "key AKIAIOSFODNN7EXAMPLE ***"),
    ("google AIzaSyA1234567890abcdefghijklmnopqrstuv", "google ***"),
]

LEFT_ALONE = [
    "max_tokens=4096 total_tokens: 1200 tokenizer=x",
    "ssh://git@github.com/acme/web.git",
    "git@github.com:acme/web.git",
    "the author: alice",
    'FATAL:  password authentication failed for user "agent"',
    "postgresql://agent@db:5432/tasks",
]


@pytest.mark.parametrize(("printed", "shown"), PRINTED)
def test_each_form_agents_print_is_masked(printed: str, shown: str) -> None:
    assert redact_secrets(printed) == shown


# Long runs that made an earlier version scan to the end of the run from every position (hours at 1 MB).
ADVERSARIAL = ["a." * 100_000, "v" + ".1" * 100_000, "-".join(["0b9d0c52-5d2c-4c55-9d1c-8e0f8f2c6a01"] * 5000),
               "://" * 60_000, "a://b" * 40_000, "%3A%2F%2F%3A" * 16_000, "password='" * 20_000]  # fmt: skip


@pytest.mark.parametrize("text", ADVERSARIAL, ids=lambda text: repr(text[:12]))
def test_long_runs_are_masked_in_one_pass(text: str) -> None:
    assert len(redact_secrets(text)) <= len(text) + 8


@pytest.mark.parametrize("text", LEFT_ALONE)
def test_text_without_a_secret_is_left_as_it_is(text: str) -> None:
    assert redact_secrets(text) == text


SECRETS = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Z")), min_size=4, max_size=40
).filter(lambda secret: not set(secret) & set("'\"\\@/?#&;,)}]=:"))
TEMPLATES = [
    "PGPASSWORD={}",
    "DATABASE_PASSWORD={} next",
    "POSTGRES_PASSWORD='{}'",
    'MYSQL_PASSWORD="{}"',
    "password: {}",
    '{{"password": "{}"}}',
    "{{'token': '{}'}}",
    "host=db password={} port=5",
    "https://{}@github.com/acme/web",
    "postgresql://owner:{}@db/name",
    "GITHUB_TOKEN={}",
    "Authorization: Bearer 1{}",
]


@given(secret=SECRETS, template=st.sampled_from(TEMPLATES), before=st.text(max_size=30), after=st.text(max_size=30))
def test_no_secret_survives_in_any_form_whatever_surrounds_it(
    secret: str, template: str, before: str, after: str
) -> None:
    fixed = template.replace("{}", "")
    assume(all(secret not in text for text in (before, after, fixed, "***")))
    assert secret not in redact_secrets(f"{before}\n{template.format(secret)}\n{after}")


def test_tasks_show_and_list_mask_stored_errors_as_the_dashboard_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(tmp_path / "contexts" / "tasks.db")))
    upgrade_schema(DatabaseConnection.get_instance())
    repository = TaskRepository()
    task_uuid = str(uuid.uuid4())
    printed = "\n".join(text for text, _shown in PRINTED)
    repository.create(
        {
            "uuid": task_uuid,
            "task_source": "github",
            "owner": "acme",
            "repo": "web",
            "task_type": "issue",
            "task_id": "1",
        }
    )
    repository.fail(task_uuid, printed)
    DatabaseConnection.reset()
    expected = redact_secrets(printed)
    assert SECRET not in expected

    assert main.main(["tasks", "show", task_uuid, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["error_message"] == expected
    assert main.main(["tasks", "show", task_uuid]) == 0
    assert SECRET not in capsys.readouterr().out
    assert main.main(["tasks", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["error_message"] == expected
