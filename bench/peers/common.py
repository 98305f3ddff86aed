"""What the peer runners share: the report's shape, the machine's description, child processes.

The runners print the same JSON shape as `python -m bench` (see bench/README.md), so `bench.compare`
reads ours and theirs alike. Standard library only, plus `bench.stats` (also standard library only):
this runs under `.venv-peers/bin/python`, where the project's dependencies are not installed.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.results import RunResult, scenario_summary

# The runners take these from here with the rest of what they share.
from bench.results import machine_info as machine_info
from bench.results import millis_between as millis_between
from bench.stats import latency_summary

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / "bench" / "peers"
STOP_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PeerScenario:
    name: str
    description: str
    headline_latency: str
    run: Callable[[], RunResult]


def measure(scenario: PeerScenario, repeat: int) -> dict[str, Any]:
    """Runs `scenario` `repeat` times and summarises it as `python -m bench` does."""
    runs: list[RunResult] = []
    for number in range(1, repeat + 1):
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


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the runner dies, even by SIGKILL."""
    if sys.platform == "linux":
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildProcess:
    """A command run as a child process in its own process group, with stdout and stderr in `log_path`."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path, *, cwd: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Ctrl-C reaches only the runner, which then stops its children in order.
                process_group=0,
                preexec_fn=_die_with_parent,
            )

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL to the whole group if it has not exited in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # The group, so that pool children of a prefork worker go too.
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value
