"""`python -m bench` runs end to end and reports well-formed figures (structure, never speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.processes import ROOT

SCALE = 0.05  # 50-node chain, 100 pipelines: seconds, not minutes


def test_bench_reports_every_scenario_with_the_expected_task_counts(tmp_path: Path) -> None:
    json_path = tmp_path / "result.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--scenario",
            "chain-1000",
            "--scenario",
            "independent-2000",
            "--repeat",
            "1",
            "--scale",
            str(SCALE),
            "--db",
            f"sqlite:///{tmp_path / 'bench.db'}",
            "--json",
            str(json_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert completed.returncode == 0, completed.stderr

    document = json.loads(completed.stdout)
    assert json.loads(json_path.read_text()) == document
    assert document["database"]["kind"] == "sqlite"
    assert document["database"]["sqlite_synchronous"] == "FULL"
    assert document["machine"]["cpu_count"] >= 1
    assert document["settings"] == {"repeat": 1, "workers": 2, "concurrency": 8, "scale": SCALE}
    assert set(document["scenarios"]) == {"chain-1000", "independent-2000"}

    chain = document["scenarios"]["chain-1000"]
    [chain_run] = chain["runs"]
    assert chain_run["tasks"] == 50
    assert chain_run["tasks_per_s"] > 0
    # Latencies between consecutive nodes: one fewer than the nodes; each node's own run: one each.
    assert chain_run["latency"]["per_node"]["count"] == 49
    assert chain_run["latency"]["handoff"]["count"] == 49
    assert chain_run["latency"]["node_run"]["count"] == 50
    assert chain["summary"]["wall_s"]["median"] == chain_run["wall_s"]

    independent = document["scenarios"]["independent-2000"]
    [independent_run] = independent["runs"]
    assert independent_run["tasks"] == 100
    assert independent_run["tasks_per_s"] > 0
    latency = independent_run["latency"]["per_pipeline"]
    assert latency["count"] == 100
    assert 0 <= latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]

    # The human table goes to stderr, so stdout stays pure JSON: one row per scenario, with 1 run.
    rows = [line.split() for line in completed.stderr.splitlines()]
    table = {row[0]: row for row in rows if len(row) > 1 and row[0] in document["scenarios"] and row[1] == "1"}
    assert set(table) == {"chain-1000", "independent-2000"}
