"""The spec cache keeps trees started again (templates) while a stream of one-off trees passes through it."""

from __future__ import annotations

import json

from engine_server.core.tree import load_tree_json, parse_tree
from engine_server.records import SpecCache
from tests.trees import chain_tree


def _tree_json(name: str) -> str:
    tree = chain_tree(["work"])
    tree["id"] = name  # a different tree text for each name
    return json.dumps(tree)


def test_a_template_started_again_stays_cached_while_one_off_trees_pass_through() -> None:
    cache = SpecCache(capacity=8)
    template = _tree_json("template")
    template_spec = cache.get(template, cycle_tolerate=False)
    for number in range(100):
        one_off = _tree_json(f"one-off-{number}")
        cache.put(one_off, parse_tree(load_tree_json(one_off)), cycle_tolerate=False)
        # Each new start of the template finds the spec parsed the first time.
        assert cache.find(template, cycle_tolerate=False) is template_spec
    # Only the latest one-off trees are kept: a cache of fresh trees holds no more than its capacity.
    assert cache.find(_tree_json("one-off-0"), cycle_tolerate=False) is None
    assert cache.find(_tree_json("one-off-99"), cycle_tolerate=False) is not None


def test_cycle_tolerance_is_part_of_the_key() -> None:
    cache = SpecCache(capacity=8)
    tree = _tree_json("tree")
    cache.get(tree, cycle_tolerate=False)
    assert cache.find(tree, cycle_tolerate=True) is None
