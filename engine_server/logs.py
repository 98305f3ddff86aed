"""The server's log lines, as text (default) or JSON, with pipeline, node and task ids as fields of their own.

Ids travel in `extra=`: ``log.info("...", extra={"pipeline_id": ..., "node_id": ...})``. Both formats show every
extra field, so a line about a pipeline can always be found by its id. The engine logs per pipeline or node
only when something needs an operator (a node failed, a pipeline was revoked, a lease expired); every state
change of every node is DEBUG, so thousands of tasks a second cost nothing at INFO.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

from engine_server.core.decide import StateChange
from engine_server.core.model import Snapshot

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

# Longest failure message copied into a log line (the whole one is in the node's ex_data).
MAX_ERROR_CHARS = 500

# Lease expiries logged one per task in a batch; beyond that, one line sums up the rest.
MAX_EXPIRY_LINES = 20


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra=` fields, without empty ones (an id that does not apply is left out)."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and value is not None and value != ""
    }


def _utc_timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, the extra fields, and exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, then the extra fields as key=value: `... node a1 failed: boom pipeline_id=... node_id=a1`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = extra_fields(record)
        if not fields:
            return line
        return line + " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if not text or any(c.isspace() or c == '"' for c in text) else text


def configure_logging(log_format: str = "text", level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Sends every logger's lines (the server's, grpc's, SQLAlchemy's) to stderr in the chosen format."""
    log_format = log_format.lower()
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# ---------------------------------------------------------------- what the engine logs after a commit


def log_state_changes(
    log: logging.Logger,
    changes: Sequence[tuple[str, Sequence[StateChange], bool]],
    snapshot_of: Callable[[str], Snapshot],
) -> None:
    """Lines about what one committed batch changed, each carrying its pipeline (and node) id.

    INFO: a node failed (with its error), a pipeline failed, was revoked, was paused or resumed.
    DEBUG: every other change (a pipeline finishing, each node's transitions). A line costs ~20 us; at INFO a
    pipeline that runs without trouble writes none.
    """
    if not changes or not log.isEnabledFor(logging.INFO):
        return
    debug = log.isEnabledFor(logging.DEBUG)
    try:
        for pipeline_id, pipeline_changes, _final in changes:
            for change in pipeline_changes:
                if change.node_id == "":
                    _log_pipeline_change(log, pipeline_id, change, debug)
                elif change.new_state == "FAILED":
                    _log_node_failure(log, pipeline_id, change, snapshot_of(pipeline_id))
                elif debug:
                    log.debug(
                        "node %s: %s -> %s",
                        change.node_id,
                        change.old_state or "(none)",
                        change.new_state or "(removed)",
                        extra={"pipeline_id": pipeline_id, "node_id": change.node_id},
                    )
    except Exception:  # runs after the commit: the batch's RPCs must still be answered as committed
        log.exception("logging the changes of a committed batch failed")


_PIPELINE_INFO_STATES = {"FAILED": "failed", "REVOKED": "was revoked", "SUSPENDED": "was paused"}


def _log_pipeline_change(log: logging.Logger, pipeline_id: str, change: StateChange, debug: bool) -> None:
    ids = {"pipeline_id": pipeline_id}
    if change.new_state in _PIPELINE_INFO_STATES:
        log.info("pipeline %s", _PIPELINE_INFO_STATES[change.new_state], extra=ids)
    elif change.new_state == "RUNNING" and change.old_state in ("SUSPENDED", "FAILED"):
        again = "resumed" if change.old_state == "SUSPENDED" else "running again (a failed node was retried or skipped)"
        log.info("pipeline %s", again, extra=ids)
    elif debug:
        log.debug("pipeline %s", change.new_state.lower(), extra=ids)


def _log_node_failure(log: logging.Logger, pipeline_id: str, change: StateChange, snapshot: Snapshot) -> None:
    run = snapshot.nodes.get(change.node_id)
    error = str(run.outputs.get("ex_data", "")) if run is not None else ""
    if len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS] + "..."
    spec = snapshot.spec.tree.nodes.get(change.node_id) if snapshot.spec.index is not None else None
    log.info(
        "node %s failed: %s",
        change.node_id,
        error or "(no message)",
        extra={
            "pipeline_id": pipeline_id,
            "node_id": change.node_id,
            "component_code": spec.component_code if spec is not None else "",
        },
    )


def log_expired_leases(log: logging.Logger, expired: Iterable[Any]) -> None:
    """One line per task whose lease ran out (its worker died or stalled); rows carry id, pipeline_id, node_id,
    component_code."""
    expired = list(expired)
    for row in expired[:MAX_EXPIRY_LINES]:
        log.info(
            "lease expired (no heartbeat): task offered again",
            extra={
                "pipeline_id": row.pipeline_id,
                "node_id": row.node_id,
                "task_id": row.id,
                "component_code": row.component_code,
            },
        )
    if len(expired) > MAX_EXPIRY_LINES:
        counts: dict[str, int] = {}
        for row in expired[MAX_EXPIRY_LINES:]:
            counts[row.component_code] = counts.get(row.component_code, 0) + 1
        log.info(
            "and %d more leases expired: %s",
            len(expired) - MAX_EXPIRY_LINES,
            ", ".join(f"{code} x{count}" for code, count in sorted(counts.items())),
        )


def request_ids(request: Any) -> Mapping[str, str]:
    """The pipeline and node ids a gRPC request names, for a line about a failed RPC."""
    return {name: str(getattr(request, name, "") or "") for name in ("pipeline_id", "node_id")}


def operation_ids(operation: Any, task_rows: Mapping[str, Any]) -> Mapping[str, str]:
    """The pipeline (and node, task) an engine operation is about, for the line saying it failed."""
    token = getattr(operation, "token", None)
    row = task_rows.get(token.task_id) if token is not None else None
    if row is not None:
        return {"pipeline_id": row.pipeline_id, "node_id": row.node_id, "task_id": row.id}
    return {"pipeline_id": getattr(operation, "pipeline_id", ""), "task_id": token.task_id if token else ""}
