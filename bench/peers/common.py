"""What the peer runners share: the report's shape, the machine's description, child processes.

The runners print the same JSON shape as `python -m bench` (see bench/README.md), so `bench.compare`
reads ours and theirs alike. Standard library only, plus `bench.stats` (also standard library only):
this runs under `.venv-peers/bin/python`, where the project's dependencies are not installed.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.results import RunResult, scenario_summary

# The runners take these from here with the rest of what they share.
from bench.results import machine_info as machine_info
from bench.results import millis_between as millis_between
from bench.runtime import ChildProcess as ChildProcess
from bench.runtime import positive_int as positive_int
from bench.runtime import progress as progress
from bench.stats import latency_summary

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / "bench" / "peers"


@dataclass(frozen=True)
class PeerScenario:
    name: str
    description: str
    headline_latency: str
    run: Callable[[], RunResult]


def measure(scenario: PeerScenario, repeat: int, before_each_run: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Runs `scenario` `repeat` times and summarises it as `python -m bench` does."""
    runs: list[RunResult] = []
    for number in range(1, repeat + 1):
        before_each_run()
        result = scenario.run()
        runs.append(result)
        headline = latency_summary(result.latencies_ms[scenario.headline_latency])
        progress(
            f"{scenario.name} run {number}/{repeat}: {result.wall_s:.2f} s, {result.tasks_per_s:.0f} tasks/s, "
            f"{scenario.headline_latency} p50 {headline['p50_ms']:.1f} ms p99 {headline['p99_ms']:.1f} ms"
        )
    return scenario_summary(scenario.description, scenario.headline_latency, runs)


def started_at() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_alive(processes: Iterable[ChildProcess]) -> None:
    """Raises if a process died: a run would otherwise wait for work that nobody does."""
    for process in processes:
        if process.exited():
            raise RuntimeError(f"{process.name} exited during the benchmark:\n{process.log_tail()}")


def wait_until(condition: Callable[[], bool], *, timeout: float, interval: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through every `with` and `finally`, so workers are stopped and databases
    # dropped, as on Ctrl-C.
    raise SystemExit(128 + signum)


def run_main(build_document: Callable[[], dict[str, Any]]) -> int:
    """Builds the document, prints it on stdout as JSON; progress and errors go to stderr."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    began = time.monotonic()
    try:
        document = build_document()
    except KeyboardInterrupt:
        progress("interrupted: the workers were stopped")
        return 130
    print(json.dumps(document, indent=2), flush=True)
    progress(f"(total {time.monotonic() - began:.0f} s)")
    return 0
