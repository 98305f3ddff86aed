"""Hand-written bamboo trees for tests (the builder is tested separately; these pin the raw format)."""

from __future__ import annotations

from typing import Any


def chain_tree(
    codes: list[str],
    *,
    inputs: dict[str, Any] | None = None,
    data_inputs: dict[str, Any] | None = None,
    node_options: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """start -> one activity per code -> end. Node ids are a0, a1, ...; flows f0, f1, ..."""
    ids = ["start", *[f"a{i}" for i in range(len(codes))], "end"]
    flows = {
        f"f{i}": {"id": f"f{i}", "source": ids[i], "target": ids[i + 1], "is_default": False}
        for i in range(len(ids) - 1)
    }
    activities = {}
    for i, code in enumerate(codes):
        activities[f"a{i}"] = {
            "id": f"a{i}",
            "type": "ServiceActivity",
            "name": f"step {i}",
            "incoming": [f"f{i}"],
            "outgoing": f"f{i + 1}",
            "component": {"code": code, "inputs": dict(inputs or {}), "version": "legacy"},
            "error_ignorable": False,
            "skippable": True,
            "retryable": True,
            **(node_options or {}).get(i, {}),
        }
    return {
        "id": "tree",
        "start_event": {
            "id": "start",
            "type": "EmptyStartEvent",
            "name": "",
            "incoming": "",
            "outgoing": "f0",
        },
        "end_event": {
            "id": "end",
            "type": "EmptyEndEvent",
            "name": "",
            "incoming": [f"f{len(codes)}"],
            "outgoing": "",
        },
        "activities": activities,
        "gateways": {},
        "flows": flows,
        "data": {"inputs": dict(data_inputs or {}), "outputs": []},
    }
