"""StartPipelines: many pipelines in one call, each started or refused exactly as StartPipeline would.

End to end against a real engine server (SQLite file and PostgreSQL) and real worker processes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from engine_api.engine.v1 import engine_pb2, engine_pb2_grpc
from tests.support.processes import ServerProcess, free_port
from tests.trees import chain_tree
from worker_sdk import AlreadyExists, EngineClient, InvalidArgument, PipelineStart, Unavailable


@pytest.fixture
def client(server: ServerProcess) -> Iterator[EngineClient]:
    with EngineClient(server.address) as engine_client:
        yield engine_client


def test_good_trees_start_and_each_bad_one_is_refused_in_its_place(client: EngineClient, start_worker: Any) -> None:
    start_worker("echo")
    no_end = chain_tree(["echo"])
    del no_end["end_event"]
    results = client.start_many(
        [
            chain_tree(["echo"]),
            no_end,
            PipelineStart(chain_tree(["echo", "echo"]), pipeline_id="order-1"),
            PipelineStart(chain_tree(["echo"]), pipeline_id="order-1"),
            PipelineStart(chain_tree(["echo"]), idempotency_key="nightly"),
            PipelineStart(chain_tree(["echo"]), idempotency_key="nightly"),
            json.dumps(chain_tree(["echo"])),
            "[" * 100_000,
        ]
    )

    assert [result.ok for result in results] == [True, False, True, False, True, True, True, False]
    assert isinstance(results[7].error, InvalidArgument)
    assert "nested too deeply" in results[7].error.message
    assert isinstance(results[1].error, InvalidArgument)
    assert "has no end event" in results[1].error.message
    assert isinstance(results[3].error, AlreadyExists)
    assert "'order-1' is already taken" in results[3].error.message
    assert results[2].pipeline_id == "order-1"
    # The second start with the same idempotency key is the first pipeline, not a new one.
    assert (results[5].pipeline_id, results[5].created) == (results[4].pipeline_id, False)
    started = {result.pipeline_id for result in results if result.ok}
    assert len(started) == 4
    for pipeline_id in started:
        assert client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"
    assert len(client.get_state("order-1")["children"]) == 4  # start, a0, a1, end: the first tree, not the second
    assert {p["id"] for p in client.list_pipelines()} == started


def test_more_than_one_call_can_carry_is_split_over_several(client: EngineClient) -> None:
    trees = [PipelineStart(chain_tree(["manual"]), pipeline_id=f"p{number:04}") for number in range(1001)]
    results = client.start_many(trees)

    assert [result.pipeline_id for result in results] == [f"p{number:04}" for number in range(1001)]
    assert all(result.ok and result.created for result in results)
    assert client.get_state("p1000")["children"]["a0"]["state"] == "RUNNING"


def test_starts_larger_than_one_message_are_split_by_size(client: EngineClient, server: ServerProcess) -> None:
    # 300 trees of ~62 KB: 19 MB, more than the server takes in one message (its tree limit + 1 MiB, 17 MiB).
    tree_json = json.dumps(chain_tree(["manual"] * 200))
    results = client.start_many([tree_json] * 300)

    assert all(result.ok for result in results)
    assert len({result.pipeline_id for result in results}) == 300


def test_a_call_that_fails_as_a_whole_marks_each_of_its_items() -> None:
    with EngineClient(f"127.0.0.1:{free_port()}", timeout=5) as nobody:
        results = nobody.start_many([chain_tree(["echo"]), chain_tree(["echo"])])
    assert [type(result.error) for result in results] == [Unavailable, Unavailable]


def test_a_request_that_is_wrong_as_a_whole_is_refused(server: ServerProcess) -> None:
    tree_json = json.dumps(chain_tree(["echo"]))
    with grpc.insecure_channel(server.address) as channel:
        engine = engine_pb2_grpc.EngineServiceStub(channel)
        with pytest.raises(grpc.RpcError) as empty:
            engine.StartPipelines(engine_pb2.StartPipelinesRequest())
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pipelines is empty" in empty.value.details()

        too_many = [engine_pb2.StartPipelineRequest(tree_json=tree_json)] * 1001
        with pytest.raises(grpc.RpcError) as refused:
            engine.StartPipelines(engine_pb2.StartPipelinesRequest(pipelines=too_many))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the limit of 1000" in refused.value.details()
        listed = engine.ListPipelines(engine_pb2.ListPipelinesRequest())
        assert list(listed.pipelines) == []  # nothing of a refused call was started
