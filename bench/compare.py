"""`python -m bench.compare`: the engine and its peers (Celery, bamboo-engine) on the same scenarios, in one run.

    python -m bench.compare                                  # every scenario, SQLite and PostgreSQL, 3 runs
    python -m bench.compare --repeat 1 --db sqlite
    python -m bench.compare --scenario bamboo-17 --scenario fanout-1000 --db postgresql

Runs, one after the other so they never share the cores: our benchmark (`python -m bench`) on each
database kind, bamboo-engine (`bench/peers/bamboo_runner.py`) on the same kinds, and Celery
(`bench/peers/celery_runner.py`, which needs no database), the peers under `.venv-peers/bin/python`
(`make bench-peers` installs it). Prints one JSON document on stdout and a table on stderr: per
scenario and database, our median wall time, the peer's, the ratio peer/ours (how many times faster
we are) and the target the project set for it. A scenario our benchmark lacks is shown as n/a.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bench.processes import ROOT
from bench.runtime import positive_int, progress

PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE_KINDS = ("sqlite", "postgresql")
# How long a child gets to stop its workers and drop its database after Ctrl-C before it is killed.
_CHILD_STOP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Comparison:
    scenario: str
    peer: str
    runner: str
    target: float
    """The ratio peer median / our median the project aims for (issue 6)."""


COMPARISONS = (
    Comparison("chains-100x17", "celery", "celery_runner.py", 3.0),
    Comparison("chain-1000", "celery", "celery_runner.py", 7.0),
    Comparison("bamboo-17", "bamboo-engine", "bamboo_runner.py", 15.0),
    Comparison("fanout-1000", "bamboo-engine", "bamboo_runner.py", 15.0),
)
DB_LESS_PEERS = ("celery",)  # measured once, compared with ours on every database kind


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[comparison.scenario for comparison in COMPARISONS],
        help="a scenario to compare (repeatable; default: all)",
    )
    parser.add_argument("--repeat", type=positive_int, default=3, help="runs of each scenario, per system (default 3)")
    parser.add_argument(
        "--db",
        action="append",
        choices=DATABASE_KINDS,
        help="database kind for our engine and bamboo-engine (repeatable; default: both; Celery uses none)",
    )
    parser.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES,
        metavar="URL",
        help=f"the PostgreSQL server (default {DEFAULT_POSTGRES})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the JSON document to PATH")
    return parser.parse_args(argv)


class ChildFailed(RuntimeError):
    pass


def run_json_child(command: list[str], what: str) -> dict[str, Any]:
    """Runs a benchmark command whose stdout is one JSON document; its stderr (progress) passes through."""
    progress(f"\n== {what}: {' '.join(command)}")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        stdout, _ = process.communicate()
    except KeyboardInterrupt:
        # Ctrl-C reached the child too (same process group): let it stop its workers and drop its
        # database, rather than kill it half-way.
        _wait_or_kill(process)
        raise
    except BaseException:
        # SIGTERM (or an error here) did not reach the child: pass it on, then wait the same way.
        process.terminate()
        _wait_or_kill(process)
        raise
    if process.returncode != 0:
        raise ChildFailed(f"{what} exited with {process.returncode} (its error is above)")
    try:
        return dict(json.loads(stdout))
    except json.JSONDecodeError as error:
        raise ChildFailed(f"{what} printed no JSON document: {error}") from error


def _wait_or_kill(process: subprocess.Popen[str]) -> None:
    try:
        process.wait(timeout=_CHILD_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _our_scenarios() -> set[str]:
    # Imported here: the scenarios are being added by others, `--help` must not depend on them.
    from bench.scenarios import SCENARIOS

    return set(SCENARIOS)


def _db_args(kind: str, postgres: str) -> list[str]:
    return [] if kind == "sqlite" else ["--db", postgres]


def _attempt(what: str, command: list[str], errors: list[str]) -> dict[str, Any]:
    """The child's document, or `{"error": ...}` so one failing system does not lose the others' figures."""
    try:
        return run_json_child(command, what)
    except ChildFailed as error:
        progress(f"!! {error}")
        errors.append(str(error))
        return {"error": str(error)}


def compare(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    names = args.scenario or [comparison.scenario for comparison in COMPARISONS]
    chosen = [comparison for comparison in COMPARISONS if comparison.scenario in names]
    kinds = args.db or list(DATABASE_KINDS)
    repeat = ["--repeat", str(args.repeat)]
    errors: list[str] = []
    if not PEERS_PYTHON.exists():
        raise SystemExit(f"{PEERS_PYTHON} is missing: run `make bench-peers`, which creates .venv-peers")

    ours_available = _our_scenarios()
    ours_names = [comparison.scenario for comparison in chosen if comparison.scenario in ours_available]
    missing = [comparison.scenario for comparison in chosen if comparison.scenario not in ours_available]
    if missing:
        progress(f"our benchmark has no scenario {', '.join(missing)} yet: shown as n/a")

    runs: dict[str, Any] = {"pipeline-engine": {}, "celery": None, "bamboo-engine": {}}
    for kind in kinds:
        if ours_names:
            command = [sys.executable, "-m", "bench", *(f"--scenario={name}" for name in ours_names), *repeat]
            runs["pipeline-engine"][kind] = _attempt(
                f"pipeline-engine on {kind}", command + _db_args(kind, args.postgres), errors
            )
        bamboo = [c.scenario for c in chosen if c.peer == "bamboo-engine"]
        if bamboo:
            command = [str(PEERS_PYTHON), str(ROOT / "bench" / "peers" / "bamboo_runner.py")]
            command += [*(f"--scenario={name}" for name in bamboo), *repeat]
            command += ["--db", "sqlite" if kind == "sqlite" else args.postgres]
            runs["bamboo-engine"][kind] = _attempt(f"bamboo-engine on {kind}", command, errors)
    celery = [c.scenario for c in chosen if c.peer == "celery"]
    if celery:
        command = [str(PEERS_PYTHON), str(ROOT / "bench" / "peers" / "celery_runner.py")]
        command += [*(f"--scenario={name}" for name in celery), *repeat]
        runs["celery"] = _attempt("celery", command, errors)

    rows = [_row(comparison, kind, runs) for comparison in chosen for kind in kinds]
    from bench.report import machine_info

    document = {
        "system": "comparison",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {"repeat": args.repeat, "databases": kinds, "scenarios": [c.scenario for c in chosen]},
        "comparisons": rows,
        "runs": runs,
    }
    return document, errors


def _median_wall(document: dict[str, Any] | None, scenario: str) -> float | str:
    """The median wall time, "n/a" when that system has no such scenario, "failed" when its run failed."""
    if document is None:
        return "n/a"
    if "error" in document:
        return "failed"
    result = document["scenarios"].get(scenario)
    if result is None:
        return "n/a"
    return float(result["summary"]["wall_s"]["median"])


def _row(comparison: Comparison, kind: str, runs: dict[str, Any]) -> dict[str, Any]:
    ours = _median_wall(runs["pipeline-engine"].get(kind), comparison.scenario)
    peer_document = runs["celery"] if comparison.peer in DB_LESS_PEERS else runs[comparison.peer].get(kind)
    peer = _median_wall(peer_document, comparison.scenario)
    ratio = round(peer / ours, 2) if isinstance(ours, float) and isinstance(peer, float) and ours > 0 else None
    return {
        "scenario": comparison.scenario,
        "database": kind,
        "ours_median_s": ours,
        "peer": comparison.peer,
        "peer_database": "none" if comparison.peer in DB_LESS_PEERS else kind,
        "peer_median_s": peer,
        "ratio": ratio,
        "target": comparison.target,
        "met": None if ratio is None else ratio >= comparison.target,
    }


def comparison_table(document: dict[str, Any]) -> str:
    header = (
        "scenario",
        "database",
        "ours (median s)",
        "peer",
        "peer (median s)",
        "ratio peer/ours",
        "target",
        "met",
    )
    lines = [header]
    for row in document["comparisons"]:
        ratio, met = row["ratio"], row["met"]
        lines.append(
            (
                row["scenario"],
                row["database"],
                _seconds(row["ours_median_s"]),
                row["peer"],
                _seconds(row["peer_median_s"]),
                "n/a" if ratio is None else f"{ratio:.1f}x faster",
                f"{row['target']:g}x",
                "n/a" if met is None else ("yes" if met else "no"),
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]
    machine = document["machine"]
    title = f"{machine['cpu_count']} CPU(s); medians of {document['settings']['repeat']} run(s) per system"
    return "\n".join([title, *text])


def _seconds(value: float | str) -> str:
    return f"{value:.2f}" if isinstance(value, float) else value


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    began = time.monotonic()
    try:
        document, errors = compare(args)
    except KeyboardInterrupt:
        progress("interrupted: every benchmark was stopped")
        return 130
    text = json.dumps(document, indent=2)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as file:
            file.write(text + "\n")
    progress(f"\n{comparison_table(document)}\n(total {time.monotonic() - began:.0f} s)")
    for error in errors:
        progress(f"failed: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
