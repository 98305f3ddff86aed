"""The log formatters, the engine's log lines about state changes, the metrics aggregation, and their settings."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from engine_server.core.decide import StateChange
from engine_server.core.model import NodeRun, NodeState, PipelineState, Snapshot
from engine_server.core.tree import parse_tree
from engine_server.logs import (
    MAX_ERROR_CHARS,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    log_expired_leases,
    log_state_changes,
)
from engine_server.metrics import EngineMetrics
from engine_server.settings import parse_args
from storage.schema import COMPLETED, FAILED
from storage.store import WriteSet
from tests.trees import chain_tree


def record(message: str = "hello %s", *args: Any, exc: bool = False, **extra: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("kaput")
        except RuntimeError:
            exc_info = sys.exc_info()
    made = logging.LogRecord("engine_server.engine", logging.INFO, __file__, 1, message, args or ("world",), exc_info)
    made.__dict__.update(extra)
    return made


def test_json_lines_carry_the_standard_fields_and_the_ids() -> None:
    line = json.loads(JsonFormatter().format(record(pipeline_id="p1", node_id="a0", task_id="", other=None)))
    assert line["level"] == "INFO"
    assert line["logger"] == "engine_server.engine"
    assert line["message"] == "hello world"
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert line["pipeline_id"] == "p1" and line["node_id"] == "a0"
    assert "task_id" not in line and "other" not in line  # empty ids are left out


def test_json_lines_keep_exceptions_and_unusual_values_on_one_line() -> None:
    text = JsonFormatter().format(record(exc=True, pipeline_id="p1", when={1, 2}, note="ünïcode"))
    assert "\n" not in text
    line = json.loads(text)
    assert "RuntimeError: kaput" in line["exc"]
    assert line["note"] == "ünïcode"
    assert line["when"] == "{1, 2}"


def test_text_lines_append_the_ids_as_key_value() -> None:
    line = TextFormatter().format(record(pipeline_id="p1", node_id="a0", component_code="echo", reason="two words"))
    assert " INFO engine_server.engine: hello world pipeline_id=p1 node_id=a0 component_code=echo" in line
    assert line.endswith('reason="two words"')
    assert TextFormatter().format(record()).endswith("engine_server.engine: hello world")


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_configure_logging_sends_json_lines_at_the_chosen_level(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("JSON", "warning", stream)
    logging.getLogger("engine_server.engine").info("not shown", extra={"pipeline_id": "p1"})
    logging.getLogger("engine_server.engine").warning("shown", extra={"pipeline_id": "p1"})
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert (line["message"], line["level"], line["pipeline_id"]) == ("shown", "WARNING", "p1")
    with pytest.raises(ValueError, match="text, json"):
        configure_logging("xml")


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def engine_log() -> Iterator[tuple[logging.Logger, Captured]]:
    logger = logging.getLogger("test.engine_log")
    captured = Captured()
    logger.addHandler(captured)
    logger.propagate = False
    yield logger, captured
    logger.removeHandler(captured)


def failed_snapshot(error: str) -> Snapshot:
    spec = parse_tree(chain_tree(["echo", "boom"]))
    nodes = {
        "a0": NodeRun("a0", NodeState.FINISHED, "v1"),
        "a1": NodeRun("a1", NodeState.FAILED, "v2", outputs={"ex_data": error, "_result": False}),
    }
    return Snapshot("p1", spec, PipelineState.FAILED, nodes, contexts={})


CHANGES = [
    (
        "p1",
        (
            StateChange("a0", "RUNNING", "FINISHED", "v1", 0),
            StateChange("a1", "", "RUNNING", "v2", 0),
            StateChange("a1", "RUNNING", "FAILED", "v2", 0),
            StateChange("", "RUNNING", "FAILED", "", 0),
        ),
        False,
    ),
    ("p2", (StateChange("", "RUNNING", "FINISHED", "", 0),), True),
]


def test_at_info_only_failures_are_logged_with_their_ids_and_error(engine_log: tuple[logging.Logger, Captured]) -> None:
    logger, captured = engine_log
    logger.setLevel(logging.INFO)
    log_state_changes(logger, CHANGES, lambda pipeline_id: failed_snapshot("E" * (MAX_ERROR_CHARS + 100)))
    lines = [(r.getMessage(), r.__dict__.get("pipeline_id"), r.__dict__.get("node_id")) for r in captured.records]
    assert lines == [
        ("node a1 failed: " + "E" * MAX_ERROR_CHARS + "...", "p1", "a1"),
        ("pipeline failed", "p1", None),
    ]
    assert captured.records[0].__dict__["component_code"] == "boom"


def test_at_debug_every_change_is_logged(engine_log: tuple[logging.Logger, Captured]) -> None:
    logger, captured = engine_log
    logger.setLevel(logging.DEBUG)
    log_state_changes(logger, CHANGES, lambda pipeline_id: failed_snapshot("boom"))
    messages = [(r.levelno, r.getMessage(), r.__dict__["pipeline_id"]) for r in captured.records]
    assert messages == [
        (logging.DEBUG, "node a0: RUNNING -> FINISHED", "p1"),
        (logging.DEBUG, "node a1: (none) -> RUNNING", "p1"),
        (logging.INFO, "node a1 failed: boom", "p1"),
        (logging.INFO, "pipeline failed", "p1"),
        (logging.DEBUG, "pipeline finished", "p2"),
    ]


def test_expired_leases_are_logged_per_task_then_summed_up(engine_log: tuple[logging.Logger, Captured]) -> None:
    logger, captured = engine_log
    logger.setLevel(logging.INFO)
    rows = [SimpleNamespace(id=f"t{i}", pipeline_id=f"p{i}", node_id="a0", component_code="echo") for i in range(25)]
    log_expired_leases(logger, rows)
    assert len(captured.records) == 21
    assert captured.records[3].__dict__["task_id"] == "t3" and captured.records[3].__dict__["pipeline_id"] == "p3"
    assert captured.records[-1].getMessage() == "and 5 more leases expired: echo x5"


def test_metrics_aggregate_a_committed_batch_per_component_code() -> None:
    metrics = EngineMetrics()
    other = EngineMetrics()  # a second engine in the same process has its own registry
    writes = WriteSet(
        task_inserts=[{"component_code": "echo"}, {"component_code": "echo"}, {"component_code": "boom"}],
        task_completions=[
            {"b_id": "t1", "completed_claim": 1, "result_kind": COMPLETED},
            {"b_id": "t2", "completed_claim": 1, "result_kind": FAILED},
        ],
    )
    rows = {
        "t1": SimpleNamespace(component_code="echo", available_at=1_000),
        "t2": SimpleNamespace(component_code="boom", available_at=1_500),
    }
    claims = [[SimpleNamespace(component_code="echo")], [], [SimpleNamespace(component_code="echo")]]
    expired = [SimpleNamespace(component_code="sleep")]
    metrics.batch_committed(0.0, 0.0, 7, writes, rows, claims, expired, 3_000)  # type: ignore[arg-type]

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("engine_tasks_queued_total", component_code="echo") == 2
    assert sample("engine_tasks_queued_total", component_code="boom") == 1
    assert sample("engine_tasks_claimed_total", component_code="echo") == 2
    assert sample("engine_tasks_completed_total", component_code="echo") == 1
    assert sample("engine_tasks_failed_total", component_code="boom") == 1
    assert sample("engine_tasks_completed_total", component_code="boom") is None
    assert sample("engine_lease_expiries_total", component_code="sleep") == 1
    assert sample("engine_task_latency_seconds_sum", component_code="echo") == 2.0
    assert sample("engine_task_latency_seconds_sum", component_code="boom") == 1.5
    assert sample("engine_db_batch_operations_sum") == 7
    assert sample("engine_db_batch_duration_seconds_count") == 1
    assert other.registry.get_sample_value("engine_tasks_queued_total", {"component_code": "echo"}) is None
    other.count_polls_with(lambda: 3)
    assert other.registry.get_sample_value("engine_polls_waiting") == 3


def test_log_and_metrics_settings_come_from_flags_and_environment() -> None:
    settings = parse_args([], environ={"ENGINE_LOG_FORMAT": "json", "ENGINE_METRICS_PORT": "9464"})
    assert (settings.log_format, settings.metrics_port, settings.metrics_host) == ("json", 9464, "127.0.0.1")
    assert parse_args(["--log-format", "text", "--log-level", "debug"], environ={}).log_format == "text"
    assert parse_args([], environ={}).metrics_port == 0  # off unless asked for
    with pytest.raises(SystemExit):
        parse_args(["--log-format", "xml"], environ={})
    with pytest.raises(SystemExit):
        parse_args([], environ={"ENGINE_LOG_LEVEL": "LOUD"})
