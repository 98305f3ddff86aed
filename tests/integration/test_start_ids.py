"""A start whose pipeline id the engine makes skips the "is this id taken?" query; a chosen id is still checked.

In-process engine on a real SQLite file; the store's lookup is wrapped to see which ids it was asked about.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from engine_server.core.tree import load_tree_json, parse_tree
from engine_server.engine import Engine
from engine_server.errors import AlreadyExists
from engine_server.settings import Settings
from storage.store import Store
from worker_sdk import EmptyEndEvent, EmptyStartEvent, ServiceActivity, build_tree


def test_only_chosen_pipeline_ids_are_looked_up_and_a_taken_one_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'engine.db'}"
    store = Store(url)
    engine = Engine(store, Settings(database_url=url))
    asked: list[list[str]] = []
    real_lookup = store.existing_pipeline_ids

    def existing_pipeline_ids(conn: Any, pipeline_ids: Any) -> set[str]:
        asked.append(sorted(pipeline_ids))
        return real_lookup(conn, pipeline_ids)

    store.existing_pipeline_ids = existing_pipeline_ids  # type: ignore[method-assign]
    start = EmptyStartEvent()
    start.extend(ServiceActivity(component_code="work")).extend(EmptyEndEvent())
    tree = json.dumps(build_tree(start))
    spec = parse_tree(load_tree_json(tree))

    async def start_three() -> tuple[str, str]:
        await engine.start()
        try:
            made, _ = await engine.enqueue_start(tree_json=tree, spec=spec, presets={})
            chosen, _ = await engine.enqueue_start(tree_json=tree, spec=spec, presets={}, pipeline_id="order-1")
            with pytest.raises(AlreadyExists, match="'order-1' is already taken"):
                await engine.enqueue_start(tree_json=tree, spec=spec, presets={}, pipeline_id="order-1")
            return made, chosen
        finally:
            await engine.stop()

    made, chosen = asyncio.run(start_three())

    assert chosen == "order-1" and made != chosen
    assert [ids for ids in asked if ids] == [["order-1"], ["order-1"]]
