"""The benchmark's output: a JSON document (for machines and later comparison) and a short table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench import results
from bench.scenarios import RunResult, Scenario

PACKAGES = ("grpcio", "protobuf", "SQLAlchemy", "psycopg")


def machine_info() -> dict[str, Any]:
    return results.machine_info(PACKAGES)


def scenario_report(scenario: Scenario, runs: Sequence[RunResult]) -> dict[str, Any]:
    return results.scenario_summary(scenario.description, scenario.headline_latency, runs)


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
