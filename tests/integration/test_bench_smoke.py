"""`python -m bench` runs every scenario end to end and reports well-formed figures (structure, never speed)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from bench.database import fresh_database
from tests.support.processes import ROOT

SCALE = 0.02  # 20-node chain, 2 bamboo pipelines, 2 fan-out branches, 200 idle pipelines: seconds, not minutes
SUSTAINED_SECONDS = 2.0
IDLE_SECONDS = 1.0
SCENARIOS = ["bamboo-17", "fanout-1000", "chain-1000", "chains-100x17", "sustained", "idle-10k", "independent-2000"]


def run_benchmark(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m bench ARGS` from the project's root; fails the test if it does not exit 0."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=100
    )
    assert completed.returncode == 0, completed.stderr
    return completed


def psycopg_engine(url: str) -> Engine:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    tmp_path = tmp_path_factory.mktemp("bench")
    json_path = tmp_path / "result.json"
    scenario_args = [arg for name in SCENARIOS for arg in ("--scenario", name)]
    completed = run_benchmark(
        *scenario_args,
        *("--repeat", "1", "--scale", str(SCALE)),
        *("--sustained-seconds", str(SUSTAINED_SECONDS), "--idle-seconds", str(IDLE_SECONDS)),
        *("--db", f"sqlite:///{tmp_path / 'bench.db'}", "--json", str(json_path)),
    )
    return json.loads(completed.stdout), completed.stderr, json_path


def only_run(document: dict[str, Any], name: str) -> dict[str, Any]:
    [run] = document["scenarios"][name]["runs"]
    assert run["wall_s"] > 0
    assert run["tasks_per_s"] > 0
    for latency in run["latency"].values():
        assert latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    return run


@pytest.mark.timeout(120)
def test_the_document_names_the_machine_settings_and_every_scenario(
    bench_run: tuple[dict[str, Any], str, Path],
) -> None:
    document, stderr, json_path = bench_run
    assert json.loads(json_path.read_text()) == document
    assert document["system"] == "pipeline-engine"
    assert document["database"]["kind"] == "sqlite"
    assert document["database"]["sqlite_synchronous"] == "FULL"
    assert document["machine"]["cpu_count"] >= 1
    assert document["settings"] == {
        "repeat": 1,
        "workers": 2,
        "concurrency": 64,
        "scale": SCALE,
        "sustained_seconds": SUSTAINED_SECONDS,
        "idle_seconds": IDLE_SECONDS,
        "client_processes": None,
    }
    assert list(document["scenarios"]) == SCENARIOS
    for name in SCENARIOS:
        summary = document["scenarios"][name]["summary"]
        # What a comparison with a peer runner joins on.
        assert summary["wall_s"]["median"] == document["scenarios"][name]["runs"][0]["wall_s"]

    # The human table goes to stderr, so stdout stays pure JSON: one row per scenario, with 1 run.
    rows = [line.split() for line in stderr.splitlines()]
    table = {row[0]: row for row in rows if len(row) > 1 and row[0] in document["scenarios"] and row[1] == "1"}
    assert set(table) == set(SCENARIOS)
    assert any(line.startswith("  sustained: saturated_tasks_per_s ") for line in stderr.splitlines())
    assert any(line.startswith("  idle-10k: idle_rss_mb ") for line in stderr.splitlines())


@pytest.mark.timeout(120)
def test_pipelines_started_together_count_every_activity_they_ran(bench_run: tuple[dict[str, Any], str, Path]) -> None:
    document, _, _ = bench_run
    # bamboo-17: 8 activities run per pipeline (the exclusive gateway takes one of its two branches).
    bamboo = only_run(document, "bamboo-17")
    assert (bamboo["pipelines"], bamboo["tasks"]) == (2, 2 * 8)
    assert bamboo["latency"]["per_node"]["count"] == 2 * 8
    assert bamboo["latency"]["per_pipeline"]["count"] == 2

    fanout = only_run(document, "fanout-1000")
    assert (fanout["pipelines"], fanout["tasks"]) == (1, 2 * 10)
    assert fanout["latency"]["per_node"]["count"] == 2 * 10

    chains = only_run(document, "chains-100x17")
    assert (chains["pipelines"], chains["tasks"]) == (2, 2 * 17)
    assert chains["latency"]["per_node"]["count"] == 2 * 17

    chain = only_run(document, "chain-1000")
    assert chain["tasks"] == 20
    # Latencies between consecutive nodes: one fewer than the nodes; each node's own run: one each.
    assert chain["latency"]["per_node"]["count"] == 19
    assert chain["latency"]["handoff"]["count"] == 19
    assert chain["latency"]["node_run"]["count"] == 20

    independent = only_run(document, "independent-2000")
    assert independent["tasks"] == 40
    assert independent["latency"]["per_pipeline"]["count"] == 40


@pytest.mark.timeout(120)
def test_sustained_reports_the_saturated_rate_and_latency_at_half_of_it(
    bench_run: tuple[dict[str, Any], str, Path],
) -> None:
    document, _, _ = bench_run
    run = only_run(document, "sustained")
    saturated, half = run["saturated"], run["half_rate"]
    assert run["wall_s"] == SUSTAINED_SECONDS
    assert 0 < run["tasks"] == saturated["finished_in_phase"] <= saturated["started"]
    # Both phases ran pipelines: the CPU per task divides the run's CPU by all of them, not by the rated phase's.
    assert run["tasks_run"] == saturated["started"] + half["started"]
    assert run["saturated_tasks_per_s"] == pytest.approx(run["tasks"] / SUSTAINED_SECONDS, rel=1e-3)
    assert run["half_rate_target_per_s"] == pytest.approx(run["saturated_tasks_per_s"] / 2, rel=1e-3)
    assert run["half_rate_offered_per_s"] > 0
    assert half["client_processes"] >= 1
    assert run["latency"]["start_to_finish"]["count"] == half["started"] > 0
    assert run["latency"]["saturated_start_to_finish"]["count"] == saturated["started"]
    assert 0 < run["half_rate_p50_ms"] <= run["half_rate_p99_ms"]
    # What limited the saturated rate: the server's and the workers' CPU during that phase, and the machine's idle.
    assert run["saturated_server_cpu_percent"] > 0 and run["saturated_workers_cpu_percent"] > 0
    assert 0 <= run["saturated_machine_idle_percent"] < 100
    # The phase's CPU is part of the whole run's (both phases and settling): a window or unit mistake breaks this.
    phase_server_ms = run["saturated_server_cpu_ms_per_task"] * run["tasks"]
    assert 0 < phase_server_ms <= run["server_cpu_ms_per_task"] * run["tasks_run"] * 1.01
    phase_workers_ms = 10 * run["saturated_workers_cpu_percent"] * SUSTAINED_SECONDS
    assert 0 < phase_workers_ms <= run["workers_cpu_ms_per_task"] * run["tasks_run"] * 1.05
    summary = document["scenarios"]["sustained"]["summary"]
    assert summary["half_rate_p99_ms"]["median"] == run["half_rate_p99_ms"]
    assert summary["saturated_tasks_per_s"]["median"] == run["saturated_tasks_per_s"]


@pytest.mark.timeout(120)
def test_idle_reports_the_engine_memory_and_cpu_and_the_time_to_call_every_pipeline_back(
    bench_run: tuple[dict[str, Any], str, Path],
) -> None:
    document, _, _ = bench_run
    run = only_run(document, "idle-10k")
    assert run["pipelines"] == run["tasks"] == 200
    assert run["latency"]["callback_to_finish"]["count"] == 200
    assert run["idle_rss_mb"] > 10  # a Python gRPC server is tens of MB at least
    assert run["rss_before_mb"] > 10
    assert 0 <= run["idle_cpu_percent"] < 200  # 2 cores at most
    assert run["idle_watched_s"] >= IDLE_SECONDS
    assert run["callback_all_s"] == run["wall_s"] > 0
    summary = document["scenarios"]["idle-10k"]["summary"]
    assert set(summary) >= {"idle_rss_mb", "idle_cpu_percent", "callback_all_s"}


@pytest.mark.timeout(120)
def test_profile_samples_the_engine_server_and_summarises_where_its_time_goes(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    completed = run_benchmark(
        *("--scenario", "sustained", "--repeat", "1", "--scale", str(SCALE)),
        *("--sustained-seconds", "1", "--db", f"sqlite:///{tmp_path / 'bench.db'}", "--profile", str(profiles)),
    )

    profile = json.loads(completed.stdout)["profile"]
    flame_graph, speedscope = Path(profile["flame_graph"]), Path(profile["speedscope"])
    summary, gil_stacks = Path(profile["summary"]), Path(profile["gil_collapsed_stacks"])
    assert {path.parent for path in (flame_graph, speedscope, summary, gil_stacks)} == {profiles}
    assert flame_graph.read_text().lstrip().startswith("<?xml")
    assert json.loads(speedscope.read_text())["profiles"]
    assert profile["gil_samples"] > 0 and profile["active_samples"] > 0
    # The server's own code shows up by name: the engine's batch loop ran while it was sampled.
    text = summary.read_text()
    assert "holding the GIL" in text and "all active threads" in text
    assert "engine_server/" in text
    assert f"summary      {summary}" in completed.stderr


def test_the_floors_of_a_chain_hop_are_measured_and_reported() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.floors", "--count", "50"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    floors = json.loads(completed.stdout)["floors"]
    assert set(floors) == {
        "sqlite_commit_us",
        "grpc_stream_round_trip_us",
        "grpc_unary_round_trip_us",
        "chain_hop_floor_sqlite_us",
        "engine_hop_sqlite_us",
    }
    hop = floors["chain_hop_floor_sqlite_us"]["p50"]
    assert hop == pytest.approx(floors["sqlite_commit_us"]["p50"] + floors["grpc_stream_round_trip_us"]["p50"])
    assert 0 < floors["sqlite_commit_us"]["p50"] <= floors["sqlite_commit_us"]["p99"]
    # The engine's own hop (report, next task, commit; no gRPC) was timed over the hops of a real chain.
    assert 0 < floors["engine_hop_sqlite_us"]["p50"] <= floors["engine_hop_sqlite_us"]["p99"]
    assert "chain_hop_floor_sqlite_us" in completed.stderr  # the table
    assert "engine_hop_sqlite_us" in completed.stderr


@pytest.mark.timeout(120)
def test_on_postgresql_without_autovacuum_each_run_starts_vacuumed(postgres_admin_url: str) -> None:
    completed = run_benchmark(
        *("--scenario", "chain-1000", "--repeat", "2", "--scale", str(SCALE)), *("--db", postgres_admin_url)
    )
    database = json.loads(completed.stdout)["database"]
    admin = psycopg_engine(postgres_admin_url)
    try:
        with admin.connect() as conn:
            autovacuum = conn.execute(text("SHOW autovacuum")).scalar_one() == "on"
    finally:
        admin.dispose()
    assert database["kind"] == "postgresql"
    assert database["autovacuum"] is autovacuum
    assert database["vacuumed_before_each_run"] is (not autovacuum)
    assert ("VACUUM (ANALYZE) before each measured run" in completed.stderr) is (not autovacuum)
    # Once before each of the two measured runs (not before the warm-up).
    assert completed.stderr.count("vacuumed the database in ") == (0 if autovacuum else 2)


def test_vacuum_if_needed_clears_the_dead_rows_of_earlier_runs(postgres_admin_url: str, tmp_path: Path) -> None:
    with fresh_database(postgres_admin_url, tmp_path) as database:
        forced = dataclasses.replace(database, autovacuum=False)  # as on a server with autovacuum off
        engine = psycopg_engine(forced.url)
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE churn (id int PRIMARY KEY, state int)"))
                conn.execute(text("INSERT INTO churn SELECT n, 0 FROM generate_series(1, 1000) AS n"))
                conn.execute(text("UPDATE churn SET state = 1"))  # 1,000 dead row versions
            forced.vacuum_if_needed()
            with engine.connect() as conn:
                statistics = (
                    "SELECT n_dead_tup, last_vacuum, last_analyze FROM pg_stat_user_tables WHERE relname = 'churn'"
                )
                dead_rows, last_vacuum, last_analyze = conn.execute(text(statistics)).one()
        finally:
            engine.dispose()
    assert dead_rows == 0
    assert last_vacuum is not None and last_analyze is not None
