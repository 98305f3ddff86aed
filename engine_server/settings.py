"""Server settings: one frozen dataclass, filled from ENGINE_* environment variables and CLI flags."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

DEFAULT_DATABASE_URL = "sqlite:///data/engine.db"


@dataclass(frozen=True, slots=True)
class Settings:
    # Address the gRPC server listens on (host:port). Loopback by default: expose it on purpose.
    listen: str = "127.0.0.1:50051"
    # sqlite:///path/to/file.db (embedded default) or postgresql://user@host/db
    database_url: str = DEFAULT_DATABASE_URL
    # redis://host:port/db to wake long polls across replicas at once; empty: replicas poll the database.
    redis_url: str = ""
    # SQLite fsync policy: FULL makes every acknowledged commit survive power loss; NORMAL only crashes.
    sqlite_synchronous: str = "FULL"
    # How long a claimed task stays with its worker without a heartbeat.
    lease_ms: int = 30_000
    # Cap on a PollTasks wait, below common load-balancer idle time-outs.
    max_poll_wait_ms: int = 20_000
    max_tasks_per_poll: int = 100
    # Largest JSON payload in one field (inputs, outputs, callback data), in bytes.
    max_payload_bytes: int = 4 * 1024 * 1024
    # Largest pipeline tree, in bytes of JSON.
    max_tree_bytes: int = 16 * 1024 * 1024
    # Retries a failure reported as retryable gets when its node has no auto_retry of its own.
    transient_retry_budget: int = 3
    # How often expired leases are looked for, and how often waiting polls re-check the database.
    reap_interval_ms: int = 1_000
    recheck_interval_ms: int = 500
    # Most events applied in one transaction.
    max_batch: int = 2_000
    # Most starts of new pipelines in one transaction: events of running pipelines go first, and a batch of
    # starts stays short (tens of ms here, where 2,000 took 0.4-1.4 s), so a burst of new pipelines holds their
    # reports back by one such batch at most.
    max_starts_per_batch: int = 250
    # How many times one node may be entered by loops before it fails.
    rerun_limit: int = 100
    # Pipelines kept in memory between events.
    cache_size: int = 20_000
    log_level: str = "INFO"
    # text: the classic line plus key=value ids; json: one object per line for log shippers.
    log_format: str = "text"
    # Prometheus /metrics over HTTP on this port; 0 serves none. Loopback by default, like `listen`.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"


_HELP = {
    "listen": "address to listen on, host:port",
    "database_url": "sqlite:///file.db (default data/engine.db) or postgresql://user@host/dbname",
    "redis_url": "redis://host:6379/0 for instant wake-ups across replicas (optional)",
    "sqlite_synchronous": "SQLite synchronous pragma: FULL (durable, default) or NORMAL",
    "lease_ms": "task lease without heartbeat, ms",
    "max_poll_wait_ms": "cap on PollTasks wait_ms",
    "max_tasks_per_poll": "cap on PollTasks max_tasks",
    "max_payload_bytes": "largest JSON payload field, bytes",
    "max_tree_bytes": "largest pipeline tree, bytes",
    "transient_retry_budget": "retries for retryable failures of nodes without auto_retry",
    "reap_interval_ms": "how often expired leases are re-offered, ms",
    "recheck_interval_ms": "how often waiting polls re-check the database, ms",
    "max_batch": "most events per transaction",
    "max_starts_per_batch": "most new pipelines per transaction (events of running pipelines go first)",
    "rerun_limit": "times a loop may enter one node before the node fails",
    "cache_size": "pipelines cached in memory",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text or json (one JSON object per line)",
    "metrics_port": "serve Prometheus metrics at http://HOST:PORT/metrics; 0: off",
    "metrics_host": "address the metrics port listens on",
}

# Fields that take one of a few words (checked for flags and ENGINE_* variables alike).
_CHOICES = {
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "log_format": ("text", "json"),
}


# Below these, a batch would have no room for one kind of operation (the engine refuses them too).
BATCH_MINIMUMS = {"max_batch": 2, "max_starts_per_batch": 1}


def env_name(field_name: str) -> str:
    return f"ENGINE_{field_name.upper()}"


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    settings = Settings()
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        default = getattr(settings, f.name)
        try:
            values[f.name] = int(raw) if isinstance(default, int) else raw
        except ValueError:
            raise SystemExit(f"{env_name(f.name)}={raw!r}: expected an integer") from None
    return replace(settings, **values)  # type: ignore[arg-type]


SUBCOMMANDS_HELP = """\
other commands:
  engine-server migrate [--database-url URL]
      upgrade the database's schema to this version's (the server refuses an older schema)
  engine-server purge --older-than AGE [--database-url URL]
      delete FINISHED and REVOKED pipelines that ended more than AGE ago (30d, 12h, 90m, 45s)
"""


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags override ENGINE_* variables, which override the defaults."""
    base = from_env(environ)
    parser = argparse.ArgumentParser(
        prog="engine-server",
        description="The pipeline engine's gRPC server (starts on SQLite with no arguments).",
        epilog=SUBCOMMANDS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in fields(Settings):
        default = getattr(base, f.name)
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag,
            dest=f.name,
            type=type(default),
            default=default,
            help=f"{_HELP[f.name]} (env {env_name(f.name)}, default {default!r})",
        )
    namespace = parser.parse_args(argv)
    settings = replace(base, **vars(namespace))
    for name, least in BATCH_MINIMUMS.items():
        if getattr(settings, name) < least:
            parser.error(f"--{name.replace('_', '-')} (or {env_name(name)}) must be at least {least}")
    for name, choices in _CHOICES.items():
        value = getattr(settings, name)
        if value.upper() not in {choice.upper() for choice in choices}:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} (or {env_name(name)}) must be one of {', '.join(choices)}, not {value!r}")
    return settings
