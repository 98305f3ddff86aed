"""The Celery app of the Celery peer: one trivial task on the local Redis (broker and result backend).

Workers run `celery -A bench.peers.celery_tasks worker`; `celery_runner.py` imports the same app to
send canvases. `CELERY_BENCH_REDIS_URL` picks the Redis database (default db 5, which the runner
flushes before and after: nothing else may use it).
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("CELERY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
QUEUE = "bench"

app = Celery("bench_peers", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(i: int) -> dict[str, int]:
    # Echoes its input, as the engine benchmark's worker does, so every task stores a small result.
    return {"i": i}
