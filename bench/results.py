"""What a benchmark run reports, in the shape both `python -m bench` and the peer runners print.

Standard library only (with `bench.stats`): the peer runners import it under `.venv-peers/bin/python`,
where the project's dependencies are not installed.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.stats import latency_summary, spread

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunResult:
    wall_s: float
    tasks: int
    latencies_ms: dict[str, list[float]]
    """Named latency samples; the scenario's `headline_latency` one goes in the table."""
    details: dict[str, Any] = field(default_factory=dict)
    """Other figures worth keeping (e.g. how long the Start calls took)."""
    figures: dict[str, float] = field(default_factory=dict)
    """Scenario-specific headline numbers (e.g. the engine's RSS): keys of the run's JSON, and
    summarised (median, min, max over the runs) under the same keys in the scenario's summary."""
    tasks_run: int = 0
    """Every task the run executed, when more than `tasks` (sustained rates one phase but runs two): the
    processes' CPU per task divides by this. Left at 0, it is `tasks`."""

    def __post_init__(self) -> None:
        self.tasks_run = self.tasks_run or self.tasks

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.wall_s

    def to_json(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 4),
            "tasks": self.tasks,
            "tasks_run": self.tasks_run,
            "tasks_per_s": round(self.tasks_per_s, 2),
            "latency": {name: latency_summary(samples) for name, samples in self.latencies_ms.items()},
            **self.details,
            **{name: round(value, 4) for name, value in self.figures.items()},
        }


def scenario_summary(description: str, headline_latency: str, runs: Sequence[RunResult]) -> dict[str, Any]:
    """A scenario's entry in the JSON document: every run, and medians / min / max over them."""
    headline = [latency_summary(run.latencies_ms[headline_latency]) for run in runs]
    # Scenario-specific figures (idle RSS, the sustained phases' rates) are summarised like the rest.
    figure_names = list(dict.fromkeys(name for run in runs for name in run.figures))
    return {
        "description": description,
        "headline_latency": headline_latency,
        "runs": [run.to_json() for run in runs],
        "summary": {
            "wall_s": spread([run.wall_s for run in runs]),
            "tasks_per_s": spread([run.tasks_per_s for run in runs]),
            "latency_p50_ms": spread([latency["p50_ms"] for latency in headline]),
            "latency_p99_ms": spread([latency["p99_ms"] for latency in headline]),
            **{name: spread([run.figures[name] for run in runs if name in run.figures]) for name in figure_names},
        },
    }


def millis_between(earlier: datetime, later: datetime) -> float:
    return (later - earlier).total_seconds() * 1000.0


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def _source_revision() -> dict[str, Any]:
    """Which code was measured: the commit, and whether tracked files differed from it."""
    try:
        commit = _git("rev-parse", "HEAD").strip()
        status = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def machine_info(packages: Iterable[str]) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {name.lower(): _package_version(name) for name in packages},
        "source": _source_revision(),
    }
