"""A TaskStream's feed skips the database after a claim that emptied the queue; it must never skip it wrongly.

An in-process engine on a real SQLite file, with re-checks far apart, so a feed that wrongly believes the
queue is empty would wait for the re-check and the test would time out.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from engine_server.core.tree import load_tree_json, parse_tree
from engine_server.engine import Engine
from engine_server.settings import Settings
from storage.store import Store
from worker_sdk import ConvergeGateway, EmptyEndEvent, EmptyStartEvent, ParallelGateway, ServiceActivity, build_tree


def _parallel_tasks(count: int) -> dict[str, Any]:
    start = EmptyStartEvent()
    branches = [ServiceActivity(component_code="work") for _ in range(count)]
    start.extend(ParallelGateway()).connect(*branches).converge(ConvergeGateway()).extend(EmptyEndEvent())
    return build_tree(start)


def test_credit_granted_while_a_full_claim_runs_does_not_make_the_feed_wait(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'engine.db'}"
    settings = Settings(database_url=url, recheck_interval_ms=60_000)
    store = Store(url)
    store.prepare_schema()

    async def queue_a_backlog() -> None:
        # Queued by an earlier server: the next one has heard of no enqueued codes, it must ask the database.
        earlier = Engine(store, settings)
        await earlier.start()
        tree = json.dumps(_parallel_tasks(20))
        await earlier.enqueue_start(tree_json=tree, spec=parse_tree(load_tree_json(tree)), presets={})
        await earlier.stop()

    asyncio.run(queue_a_backlog())

    store = Store(url)
    engine = Engine(store, settings)
    feed = engine.open_task_feed("worker-1", ["work"])
    real_claim = store.claim
    calls = 0

    def claim_while_credit_arrives(*args: Any, **kwargs: Any) -> Any:
        # The first claim (limit 2) runs while the worker grants 8 more credits: it comes back full, not short.
        nonlocal calls
        calls += 1
        if calls == 1:
            granted = threading.Event()
            loop.call_soon_threadsafe(lambda: (feed.add_credit(8), granted.set()))
            granted.wait(5)
        return real_claim(*args, **kwargs)

    store.claim = claim_while_credit_arrives  # type: ignore[method-assign]

    async def take_twice() -> tuple[int, int]:
        await engine.start()
        try:
            feed.add_credit(2)
            first = await asyncio.wait_for(feed.next_tasks(), 10)
            # 18 tasks are still queued and the feed has 8 credits: they come now, not at the re-check.
            second = await asyncio.wait_for(feed.next_tasks(), 5)
            return len(first), len(second)
        finally:
            await engine.stop()

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(take_twice()) == (2, 8)
    finally:
        loop.close()
