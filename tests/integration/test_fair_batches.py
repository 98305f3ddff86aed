"""A burst of starts must not hold back the pipelines already running.

An in-process engine on a real SQLite file: a worker's report queued behind hundreds of new pipelines' starts is
applied in the next batch, with a few of the starts, instead of after all of them.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from engine_server.core.model import PipelineState
from engine_server.core.tree import load_tree_json, parse_tree
from engine_server.engine import Engine
from engine_server.settings import Settings, parse_args
from storage.store import Store
from worker_sdk import EmptyEndEvent, EmptyStartEvent, ServiceActivity, build_tree

BURST = 400
STARTS_PER_BATCH = 10


def _one_activity_tree() -> str:
    start = EmptyStartEvent()
    start.extend(ServiceActivity(component_code="work")).extend(EmptyEndEvent())
    return json.dumps(build_tree(start))


def test_a_report_is_applied_before_a_burst_of_starts_queued_ahead_of_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'engine.db'}"
    store = Store(url)
    store.prepare_schema()
    engine = Engine(store, Settings(database_url=url, max_starts_per_batch=STARTS_PER_BATCH))

    async def scenario() -> tuple[int, PipelineState, list[str]]:
        await engine.start()
        try:
            running_tree = _one_activity_tree()
            running_id, _ = await engine.enqueue_start(
                tree_json=running_tree, spec=parse_tree(load_tree_json(running_tree)), presets={}
            )
            [task] = await engine.poll_tasks("worker-1", ["work"], 1, 5_000)
            burst_tree = _one_activity_tree()
            burst_spec = parse_tree(load_tree_json(burst_tree))
            # Queued in one turn of the event loop, the starts ahead of the report.
            burst = [engine.enqueue_start(tree_json=burst_tree, spec=burst_spec, presets={}) for _ in range(BURST)]
            await engine.enqueue_complete(task.token, {"done": True})
            starts_committed_with_the_report = sum(1 for started in burst if started.done())
            burst_ids = [pipeline_id for pipeline_id, _ in await asyncio.gather(*burst)]
            return starts_committed_with_the_report, await engine.get_pipeline_state(running_id), burst_ids
        finally:
            await engine.stop()

    committed_first, running_state, burst_ids = asyncio.run(scenario())
    # The report rode in the first batch with at most a batch's worth of starts (and the next batch's, if it ended
    # before this coroutine resumed); in arrival order it would have waited for all of them.
    assert committed_first <= 2 * STARTS_PER_BATCH
    assert running_state is PipelineState.FINISHED
    # Every start of the burst was still committed, each as its own pipeline.
    assert len(set(burst_ids)) == BURST


def test_a_start_is_not_held_back_by_a_queue_of_events_longer_than_a_batch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'engine.db'}"
    store = Store(url)
    store.prepare_schema()
    engine = Engine(store, Settings(database_url=url, max_batch=4, max_starts_per_batch=2))

    async def scenario() -> tuple[int, int]:
        await engine.start()
        try:
            tree = _one_activity_tree()
            spec = parse_tree(load_tree_json(tree))
            await engine.enqueue_start(tree_json=tree, spec=spec, presets={})
            [task] = await engine.poll_tasks("worker-1", ["work"], 1, 5_000)
            # Forty events queued ahead of the start: ten batches' worth.
            heartbeats = [engine.enqueue_heartbeat(task.token) for _ in range(40)]
            await engine.enqueue_start(tree_json=tree, spec=spec, presets={})
            heartbeats_applied_before_the_start = sum(1 for beat in heartbeats if beat.done())
            await asyncio.gather(*heartbeats)
            return heartbeats_applied_before_the_start, len(heartbeats)
        finally:
            await engine.stop()

    applied_first, total = asyncio.run(scenario())
    # The start took its share of the first batch (or the second, if that ended before this coroutine resumed).
    assert applied_first <= 2 * 3
    assert total == 40


@pytest.mark.parametrize(("flag", "least"), [("--max-starts-per-batch", 1), ("--max-batch", 2)])
def test_batch_limits_too_small_to_drain_the_queues_are_refused(flag: str, least: int, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args([flag, str(least - 1)], environ={})
    with pytest.raises(SystemExit):
        parse_args([], environ={"ENGINE_" + flag[2:].replace("-", "_").upper(): str(least - 1)})
    settings = parse_args([flag, str(least)], environ={})
    field = flag[2:].replace("-", "_")
    assert getattr(settings, field) == least
    # Settings built in code are refused by the engine itself.
    with pytest.raises(ValueError, match="at least"):
        Engine(Store(f"sqlite:///{tmp_path / 'engine.db'}"), replace(settings, **{field: least - 1}))
