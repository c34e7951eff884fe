"""Many agent processes on one PostgreSQL: full TaskContextManager life cycles, per-call latency, totals checked.

Each process runs `--tasks` life cycles (register, messages and tool calls on disk, statistics, completion)
through its own pool. Prints tasks/s, p50/p95 of every repository call, and checks the database's totals.

    python -m bench.scale [--processes 8] [--tasks 40] [--pool-size 2] [--max-overflow 1]

`--curve`: aggregate `update_statistics` per second with 1, 4, 16 and 64 agent processes, directly and through
PgBouncer (transaction mode, 20 server connections), each beside `pgbench` running the same UPDATE with the
same number of clients against the same server in the same run.

    python -m bench.scale --curve [--clients 1,4,16,64] [--seconds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from context_storage import GitHubIssueTaskKey, TaskContextManager
from db import DatabaseConfig, DatabaseConnection, PoolConfig, TaskRepository
from db.schema import upgrade_schema
from ops.backup import find_pg_tool
from tools.pgbouncer import PgBouncer
from tools.postgres_server import start_postgres

TIMED = ("create", "update", "update_status", "update_statistics", "complete", "fail", "get_by_uuid")
STATISTICS_PER_TASK = 5


def agent(index: int, config: dict[str, Any], url: str, tasks: int, out: str) -> None:
    """One agent process: `tasks` life cycles, timing every repository call."""
    connection = DatabaseConnection.initialize(DatabaseConfig.load(config, env={"DATABASE_URL": url}))
    repository = TaskRepository(connection)
    timings: dict[str, list[float]] = defaultdict(list)
    for name in TIMED:
        method = getattr(repository, name)

        def timed(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                timings[_name].append((time.perf_counter() - started) * 1000)

        setattr(repository, name, timed)
    uuids = []
    started = time.perf_counter()
    for number in range(tasks):
        task_uuid = str(uuid.uuid4())
        manager = TaskContextManager(
            GitHubIssueTaskKey("acme", "web", index * 10_000 + number),
            task_uuid,
            config,
            user=f"user{index}",
            repository=repository,
        )
        for turn in range(STATISTICS_PER_TASK):
            manager.get_message_store().add_message("assistant", f"turn {turn} " + "x" * 400)
            manager.get_tool_store().add_tool_call("read_file", {"path": "a.py"}, "ok", "success", 3)
            manager.update_statistics(llm_calls=1, tool_calls=2, tokens=100)
        manager.complete()
        uuids.append(task_uuid)
    elapsed = time.perf_counter() - started
    Path(out).write_text(json.dumps({"uuids": uuids, "seconds": elapsed, "timings": timings}), encoding="utf-8")
    DatabaseConnection.reset()


def counting_agent(url: str, task_uuid: str, start_file: str, seconds: float, out: str) -> None:
    """One agent process adding to its own task as fast as it can for `seconds` once `start_file` appears."""
    config = DatabaseConfig(url=url, statement_timeout=0, lock_timeout=0, pool=PoolConfig(size=1, max_overflow=0))
    repository = TaskRepository(DatabaseConnection.initialize(config))
    repository.get_by_uuid(task_uuid)  # connected before the clock starts, as pgbench is
    while not Path(start_file).exists():
        time.sleep(0.01)
    calls, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        repository.update_statistics(task_uuid, llm_calls=1, tool_calls=2, tokens=100)
        calls += 1
    Path(out).write_text(str(calls), encoding="utf-8")
    DatabaseConnection.reset()


PGBENCH_SCRIPT = (
    "UPDATE tasks SET llm_call_count = llm_call_count + 1, tool_call_count = tool_call_count + 2, "
    "total_tokens = total_tokens + 100, updated_at = now() WHERE uuid = md5((:client_id + 1)::text)::uuid;\n"
)


def agents_rate(url: str, clients: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        start = Path(workdir) / "start"
        outputs = [Path(workdir) / f"{index}.out" for index in range(clients)]
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(
                target=counting_agent,
                args=(
                    url,
                    str(uuid.UUID(hashlib.md5(str(index + 1).encode(), usedforsecurity=False).hexdigest())),
                    str(start),
                    seconds,
                    str(out),
                ),
            )
            for index, out in enumerate(outputs)
        ]
        for process in processes:
            process.start()
        time.sleep(2 + clients * 0.4)  # let every process import and connect
        start.touch()
        for process in processes:
            process.join()
        return sum(int(out.read_text()) for out in outputs) / seconds


def pgbench_rate(url: Any, clients: int, seconds: float) -> float:
    pgbench = find_pg_tool("pgbench")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(PGBENCH_SCRIPT)
    env = {**os.environ, "PGPASSWORD": str(url.password)}
    result = subprocess.run(
        [pgbench, "-n", "-h", str(url.host), "-p", str(url.port), "-U", str(url.username), "-c", str(clients),
         "-j", str(min(clients, 2)), "-T", str(int(seconds)), "-f", script.name, str(url.database)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    os.unlink(script.name)
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", result.stdout)
    if match is None:
        raise SystemExit(f"pgbench printed no rate: {result.stdout[-500:]}")
    return float(match.group(1))


def curve(clients_list: list[int], seconds: float) -> None:
    server = start_postgres(need_cluster=True)
    bouncer = None
    try:
        server.execute_admin("CREATE ROLE agent LOGIN PASSWORD 'agent-pass'", "CREATE DATABASE bench_curve OWNER agent")
        direct = server.database_url("bench_curve").set(username="agent", password="agent-pass")
        connection = DatabaseConnection.initialize(DatabaseConfig(url=direct.render_as_string(hide_password=False)))
        upgrade_schema(connection)
        with connection.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, "
                "updated_at) SELECT md5(i::text)::uuid, 'github', 'acme', 'web', 'issue', i::text, 'running', "
                "now(), now() "
                f"FROM generate_series(1, {max(clients_list)}) AS i"
            )
        DatabaseConnection.reset()
        bouncer = PgBouncer(server.url, "bench_curve", "agent", "agent-pass", pool_size=20)
        bouncer.start()
        print(f"server: {server.description}; update_statistics per second, {seconds:.0f} s each, best of one run")
        print(f"{'clients':>7}  {'path':<10} {'repository':>11} {'pgbench':>9} {'ratio':>6}")
        for path, url in (("direct", direct), ("pgbouncer", bouncer.url)):
            text = url.render_as_string(hide_password=False)
            for clients in clients_list:
                ours = agents_rate(text, clients, seconds)
                theirs = pgbench_rate(url, clients, seconds)
                print(f"{clients:>7}  {path:<10} {ours:>11,.0f} {theirs:>9,.0f} {ours / theirs:>5.2f}x")
    finally:
        DatabaseConnection.reset()
        if bouncer is not None:
            bouncer.stop()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curve", action="store_true", help="update_statistics/s at several client counts")
    parser.add_argument("--clients", default="1,4,16,64", help="client counts for --curve")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement for --curve")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--max-overflow", type=int, default=1)
    args = parser.parse_args()
    if args.curve:
        curve([int(part) for part in args.clients.split(",")], args.seconds)
        return
    server = start_postgres(need_cluster=True)
    try:
        server.execute_admin("CREATE DATABASE bench_scale")
        url = server.database_url("bench_scale").render_as_string(hide_password=False)
        connection = DatabaseConnection.initialize(DatabaseConfig(url=url))
        upgrade_schema(connection)
        with connection.engine.connect() as conn:
            max_connections = int(conn.exec_driver_sql("SHOW max_connections").scalar_one())
        DatabaseConnection.reset()
        peak = args.processes * (args.pool_size + args.max_overflow)
        print(f"server: {server.description}; max_connections {max_connections}")
        print(
            f"{args.processes} processes x (pool_size {args.pool_size} + max_overflow {args.max_overflow}) "
            f"= at most {peak} connections"
        )
        if peak > max_connections - 3:  # superuser_reserved_connections
            raise SystemExit("the pools could exhaust max_connections: lower pool_size or max_overflow")
        results, elapsed = run_agents(url, args)
        report(url, results, elapsed)
    finally:
        DatabaseConnection.reset()
        server.stop()


def run_agents(url: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    with tempfile.TemporaryDirectory() as workdir:
        outputs = [Path(workdir) / f"agent-{index}.json" for index in range(args.processes)]
        context = multiprocessing.get_context("spawn")
        processes = []
        started = time.perf_counter()
        for index, out in enumerate(outputs):
            config = {
                "context_storage": {"base_dir": str(Path(workdir) / f"contexts-{index}")},
                "llm": {"provider": "openai", "openai": {"model": "gpt-4o", "context_length": 128000}},
                "database": {"pool": {"size": args.pool_size, "max_overflow": args.max_overflow}},
            }
            process = context.Process(target=agent, args=(index, config, url, args.tasks, str(out)))
            process.start()
            processes.append(process)
        for process in processes:
            process.join()
        elapsed = time.perf_counter() - started
        if any(process.exitcode != 0 for process in processes):
            raise SystemExit("an agent process failed")
        return [json.loads(out.read_text(encoding="utf-8")) for out in outputs], elapsed


def report(url: str, results: list[dict[str, Any]], elapsed: float) -> None:
    total_tasks = sum(len(result["uuids"]) for result in results)
    print(f"\n{total_tasks} task life cycles in {elapsed:.1f}s: {total_tasks / elapsed:.1f} tasks/s")
    print(f"{'repository call':<20} {'calls':>7} {'p50 ms':>8} {'p95 ms':>8}")
    for name in TIMED:
        samples = [sample for result in results for sample in result["timings"].get(name, [])]
        if len(samples) >= 2:
            p95 = statistics.quantiles(samples, n=20)[18]
            print(f"{name:<20} {len(samples):>7} {statistics.median(samples):>8.2f} {p95:>8.2f}")
    connection = DatabaseConnection.initialize(DatabaseConfig(url=url))
    repository = TaskRepository(connection)
    wrong = 0
    for result in results:
        for key in result["uuids"]:
            task = repository.get_by_uuid(key)
            expected = (STATISTICS_PER_TASK, 2 * STATISTICS_PER_TASK, 100 * STATISTICS_PER_TASK, "completed")
            if task is None or (task.llm_call_count, task.tool_call_count, task.total_tokens, task.status) != expected:
                wrong += 1
    print(f"\ntotals checked: {total_tasks - wrong} of {total_tasks} tasks exact")
    if wrong:
        raise SystemExit(f"{wrong} tasks have wrong totals")


if __name__ == "__main__":
    main()
