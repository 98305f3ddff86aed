"""The benchmark's output: a JSON document (for machines and later comparison) and a short table."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from bench.processes import ROOT
from bench.scenarios import RunResult, Scenario
from bench.stats import spread

PACKAGES = ("grpcio", "protobuf", "SQLAlchemy", "psycopg")


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


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {name.lower(): _package_version(name) for name in PACKAGES},
        "source": _source_revision(),
    }


def scenario_report(scenario: Scenario, runs: Sequence[RunResult]) -> dict[str, Any]:
    headline = [run.to_json()["latency"][scenario.headline_latency] for run in runs]
    # Scenario-specific figures (idle RSS, the sustained phases' rates) are summarised like the rest.
    figure_names = list(dict.fromkeys(name for run in runs for name in run.figures))
    return {
        "description": scenario.description,
        "headline_latency": scenario.headline_latency,
        "runs": [run.to_json() for run in runs],
        "summary": {
            "wall_s": spread([run.wall_s for run in runs]),
            "tasks_per_s": spread([run.tasks_per_s for run in runs]),
            "latency_p50_ms": spread([latency["p50_ms"] for latency in headline]),
            "latency_p99_ms": spread([latency["p99_ms"] for latency in headline]),
            **{name: spread([run.figures[name] for run in runs if name in run.figures]) for name in figure_names},
        },
    }


# The summary keys every scenario has; any other key is a scenario-specific figure.
_COMMON_SUMMARY_KEYS = frozenset({"wall_s", "tasks_per_s", "latency_p50_ms", "latency_p99_ms"})


def summary_table(document: dict[str, Any]) -> str:
    """One line per scenario; every figure is the median over its runs."""
    header = ("scenario", "runs", "wall s", "min-max s", "tasks/s", "latency", "p50 ms", "p99 ms")
    rows = [header]
    for name, result in document["scenarios"].items():
        summary = result["summary"]
        wall = summary["wall_s"]
        rows.append(
            (
                name,
                str(len(result["runs"])),
                f"{wall['median']:.2f}",
                f"{wall['min']:.2f}-{wall['max']:.2f}",
                f"{summary['tasks_per_s']['median']:.0f}",
                result["headline_latency"],
                f"{summary['latency_p50_ms']['median']:.1f}",
                f"{summary['latency_p99_ms']['median']:.1f}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    for name, result in document["scenarios"].items():
        figures = {key: value for key, value in result["summary"].items() if key not in _COMMON_SUMMARY_KEYS}
        if figures:
            shown = ", ".join(f"{key} {_figure_text(value['median'])}" for key, value in figures.items())
            lines.append(f"  {name}: {shown}")
    database = document["database"]
    settings = document["settings"]
    durability = f", synchronous={database['sqlite_synchronous']}" if database["kind"] == "sqlite" else ""
    title = (
        f"{database['kind']} {database['server_version']}{durability}; "
        f"{settings['workers']} worker(s) x {settings['concurrency']}; "
        f"{document['machine']['cpu_count']} CPU(s); medians of {settings['repeat']} run(s)"
    )
    return "\n".join([title, *lines])


def _figure_text(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"
