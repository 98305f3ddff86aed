"""Prometheus metrics of one engine, in a registry of its own (several engines in one process never clash).

The engine calls `batch_committed` once per committed batch; counters are aggregated per component code
there, so the hot path pays a few `inc()` calls per batch, not per task. Gauges that need the database
(pipelines by state) are read on a reader connection at scrape time, at most every few seconds.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine_server.core.model import PipelineState
from storage.schema import FAILED
from storage.store import Store, WriteSet

if TYPE_CHECKING:
    from engine_server.engine import ClaimedTask

log = logging.getLogger("engine_server.metrics")

# End-to-end task latency: from milliseconds (an idle worker pool) to an hour (long-running components).
TASK_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# One transaction: a SQLite fsync is ~1 ms on an SSD, a PostgreSQL round trip well under that.
DB_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Operations per batch, up to --max-batch (2000 by default).
BATCH_SIZE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

# Pipelines by state are counted at most this often, however often Prometheus scrapes.
PIPELINE_COUNT_MAX_AGE_S = 2.0


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        by_code = ["component_code"]
        self.tasks_queued = Counter(
            "engine_tasks_queued_total",
            "Tasks offered to workers (each attempt, retry and poll-again is a new task).",
            by_code,
            registry=self.registry,
        )
        self.tasks_claimed = Counter(
            "engine_tasks_claimed_total",
            "Task claims handed to workers (a task offered again after its lease expired is claimed again).",
            by_code,
            registry=self.registry,
        )
        self.tasks_completed = Counter(
            "engine_tasks_completed_total",
            "Tasks whose CompleteTask was applied (duplicates not counted).",
            by_code,
            registry=self.registry,
        )
        self.tasks_failed = Counter(
            "engine_tasks_failed_total",
            "Tasks whose FailTask was applied (duplicates not counted).",
            by_code,
            registry=self.registry,
        )
        self.task_latency = Histogram(
            "engine_task_latency_seconds",
            "From a task becoming available to its result (complete or fail) being committed.",
            by_code,
            buckets=TASK_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lease_expiries = Counter(
            "engine_lease_expiries_total",
            "Claimed tasks offered again because their lease ran out without a heartbeat.",
            by_code,
            registry=self.registry,
        )
        self.polls_waiting = Gauge(
            "engine_polls_waiting",
            "Long polls (and task streams with credit) waiting for tasks on this server.",
            registry=self.registry,
        )
        self.batch_duration = Histogram(
            "engine_db_batch_duration_seconds",
            "One batch's transaction, from BEGIN to COMMIT returning (reads, writes, claims and the commit).",
            buckets=DB_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.commit_duration = Histogram(
            "engine_db_commit_duration_seconds",
            "The COMMIT of one batch alone (on SQLite with synchronous=FULL, mostly the fsync).",
            buckets=DB_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_operations = Histogram(
            "engine_db_batch_operations",
            "Operations (starts, task reports, heartbeats, control calls) applied in one transaction.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        Info("engine_build", "The engine server's version.", registry=self.registry).info(
            {"version": _package_version(), "python": platform.python_version()}
        )
        self._pipelines: _PipelinesByState | None = None
        # labels() validates and hashes on every call; the engine asks for the same few children all the time.
        self._children: dict[tuple[int, str], Any] = {}

    # ------------------------------------------------------------ called by the engine

    def count_polls_with(self, count: Callable[[], int]) -> None:
        """The waiting-polls gauge reads this at scrape time (nothing to update on the hot path)."""
        self.polls_waiting.set_function(count)

    def batch_committed(
        self,
        started: float,
        writes_done: float,
        operations: int,
        writes: WriteSet,
        reported_tasks: Mapping[str, Any],
        claims: Sequence[Sequence[ClaimedTask]],
        expired_leases: Sequence[Any],
        now_ms: int,
    ) -> None:
        """One committed batch: `started`/`writes_done` are perf_counter() at BEGIN and before COMMIT;
        `reported_tasks` are the task rows the batch loaded for reports (with component_code, available_at).

        Never raises: the batch is already committed, and its RPCs must be answered as such."""
        committed = time.perf_counter()
        try:
            self.batch_duration.observe(committed - started)
            self.commit_duration.observe(committed - writes_done)
            if operations:  # claim-only and re-check batches would drag "events per commit" towards zero
                self.batch_operations.observe(operations)
            if writes.task_inserts:
                self._add(self.tasks_queued, Tally(task["component_code"] for task in writes.task_inserts))
            if any(claims):
                self._add(self.tasks_claimed, Tally(task.component_code for claimed in claims for task in claimed))
            if expired_leases:
                self._add(self.lease_expiries, Tally(row.component_code for row in expired_leases))
            if writes.task_completions:
                self._reported(writes.task_completions, reported_tasks, now_ms)
        except Exception:
            log.exception("updating the metrics of a committed batch failed")

    def _reported(self, completions: Iterable[Mapping[str, Any]], rows: Mapping[str, Any], now_ms: int) -> None:
        completed: Tally[str] = Tally()
        failed: Tally[str] = Tally()
        latencies: dict[str, list[float]] = {}
        for completion in completions:
            row = rows.get(completion["b_id"])
            if row is None:
                continue
            code = row.component_code
            (failed if completion["result_kind"] == FAILED else completed)[code] += 1
            latencies.setdefault(code, []).append(max(0, now_ms - row.available_at) / 1000)
        self._add(self.tasks_completed, completed)
        self._add(self.tasks_failed, failed)
        for code, seconds in latencies.items():
            histogram = self._child(self.task_latency, code)
            for value in seconds:
                histogram.observe(value)

    def _child(self, metric: Any, code: str) -> Any:
        key = (id(metric), code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(code)
        return child

    def _add(self, counter: Counter, counts: Mapping[str, int]) -> None:
        for code, count in counts.items():
            self._child(counter, code).inc(count)

    # ------------------------------------------------------------ wired by the server

    def count_pipelines_from(self, store: Store) -> None:
        """Exports `engine_pipelines{state}`, counted on a reader connection at scrape time."""
        if self._pipelines is None:
            self._pipelines = _PipelinesByState(store)
            self.registry.register(self._pipelines)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serves /metrics over HTTP in a thread of its own; raises OSError when the address is taken."""
        httpd, thread = start_http_server(port, host, registry=self.registry)
        return MetricsServer(httpd, thread)

    def exposition(self) -> str:
        """The metrics in Prometheus' text format (what /metrics answers)."""
        return generate_latest(self.registry).decode()


class MetricsServer:
    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self.httpd = httpd
        self.thread = thread
        self.port: int = httpd.server_port

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _PipelinesByState(Collector):
    """A COUNT ... GROUP BY state on a reader connection, cached for a few seconds; every state is exported
    (0 included), so dashboards see stable series."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._counts: dict[str, int] | None = None
        self._counted_at = 0.0

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._counts is None or time.monotonic() - self._counted_at >= PIPELINE_COUNT_MAX_AGE_S:
                try:
                    with self.store.reader.connect() as conn:
                        self._counts = self.store.count_pipelines_by_state(conn)
                    self._counted_at = time.monotonic()
                except Exception as exc:  # the database is away: leave the gauge out rather than show stale counts
                    log.warning("counting pipelines by state for /metrics failed: %s", exc)
                    self._counts = None
                    return []
            counts = self._counts
        family = self._family()
        for state in PipelineState:
            family.add_metric([state.value], counts.get(state.value, 0))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("engine_pipelines", "Pipelines in the database by state.", labels=["state"])


def _package_version() -> str:
    try:
        return metadata.version("pipeline-engine")
    except metadata.PackageNotFoundError:
        return "unknown"
