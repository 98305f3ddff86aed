"""How `EngineClient.start_many` splits its pipelines into StartPipelines calls (no server needed)."""

from __future__ import annotations

from engine_api.engine.v1.engine_pb2 import StartPipelineRequest
from worker_sdk.client import START_CALL_BYTES, STARTS_PER_CALL, start_calls


def request(size: int, name: str = "") -> StartPipelineRequest:
    return StartPipelineRequest(tree_json="x" * size, pipeline_id=name)


def test_small_starts_go_1000_to_a_call_in_order() -> None:
    requests = [request(10, f"p{number}") for number in range(2500)]
    calls = start_calls(requests)
    assert [len(call) for call in calls] == [STARTS_PER_CALL, STARTS_PER_CALL, 500]
    assert [item.pipeline_id for call in calls for item in call] == [f"p{number}" for number in range(2500)]


def test_large_starts_are_split_by_size_and_an_oversized_one_goes_alone() -> None:
    quarter = START_CALL_BYTES // 4
    calls = start_calls([request(quarter)] * 5 + [request(3 * START_CALL_BYTES)] + [request(10)])
    assert [len(call) for call in calls] == [3, 2, 1, 1]
    assert all(sum(item.ByteSize() for item in call) <= START_CALL_BYTES for call in calls if len(call) > 1)


def test_no_starts_make_no_calls() -> None:
    assert start_calls([]) == []
