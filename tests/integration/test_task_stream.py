"""TaskStream, the optional streaming worker transport, spoken raw as a worker in another language would."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine_api.engine.v1 import worker_pb2, worker_pb2_grpc
from tests.support.processes import ServerProcess
from tests.trees import chain_tree
from worker_sdk import EngineClient, Worker, component

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


class RawStream:
    """A TaskStream driven by hand: send messages, read what the server sends, one at a time."""

    def __init__(self, address: str, *codes: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.outgoing: queue.SimpleQueue[worker_pb2.TaskStreamRequest | None] = queue.SimpleQueue()
        # Tasks and replies one by one, however the server packed them.
        self.incoming: queue.SimpleQueue[worker_pb2.Task | worker_pb2.StreamReply | grpc.RpcError] = queue.SimpleQueue()
        if codes:
            self.send(hello=worker_pb2.StreamHello(worker_id="raw-test", component_codes=codes))
        self.call = worker_pb2_grpc.WorkerServiceStub(self.channel).TaskStream(self._requests())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _requests(self) -> Iterator[worker_pb2.TaskStreamRequest]:
        while (message := self.outgoing.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for response in self.call:
                for reply in response.replies:
                    self.incoming.put(reply)
                for task in response.tasks:
                    self.incoming.put(task)
        except grpc.RpcError as error:
            self.incoming.put(error)

    def send(self, **fields: object) -> None:
        self.outgoing.put(worker_pb2.TaskStreamRequest(**fields))  # type: ignore[arg-type]

    def report(self, request_id: int, **report: object) -> None:
        self.send(reports=[worker_pb2.StreamReport(request_id=request_id, **report)])  # type: ignore[arg-type]

    def receive(self, timeout: float = 10.0) -> worker_pb2.Task | worker_pb2.StreamReply:
        item = self.incoming.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def task(self) -> worker_pb2.Task:
        item = self.receive()
        assert isinstance(item, worker_pb2.Task), item
        return item

    def reply(self) -> worker_pb2.StreamReply:
        item = self.receive()
        assert isinstance(item, worker_pb2.StreamReply), item
        return item

    def nothing_within(self, seconds: float) -> bool:
        try:
            self.incoming.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.outgoing.put(None)
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[EngineClient]:
    with EngineClient(server.address) as engine_client:
        yield engine_client


def test_the_server_sends_no_more_tasks_than_the_worker_granted(server: ServerProcess, client: EngineClient) -> None:
    ids = [client.start(chain_tree(["streamed"], inputs={"n": {"type": "plain", "value": n}})) for n in range(3)]
    stream = RawStream(server.address, "streamed")
    try:
        stream.send(credit=2)
        first, second = stream.task(), stream.task()
        assert {first.pipeline_id, second.pipeline_id} < set(ids)
        assert stream.nothing_within(0.8), "a third task arrived with only two credits"

        stream.report(7, complete=worker_pb2.CompleteTaskRequest(token=first.token, outputs_json='{"x": 1}'))
        reply = stream.reply()
        assert reply.request_id == 7 and reply.WhichOneof("result") == "complete" and not reply.complete.duplicate
        assert stream.nothing_within(0.5), "completing a task is not a credit: only `credit` grants more"

        stream.send(credit=1)
        third = stream.task()
        assert {first.pipeline_id, second.pipeline_id, third.pipeline_id} == set(ids)
        assert client.wait(first.pipeline_id, timeout=10)["state"] == "FINISHED"
        assert client.get_node_data(first.pipeline_id, "a0")["outputs"]["x"] == 1
    finally:
        stream.close()


def test_reports_on_the_stream_are_answered_like_the_unary_calls(server: ServerProcess, client: EngineClient) -> None:
    pipeline_id = client.start(chain_tree(["streamed"]))
    stream = RawStream(server.address, "streamed")
    try:
        stream.send(credit=1)
        task = stream.task()
        stream.report(1, heartbeat=worker_pb2.HeartbeatRequest(token=task.token))
        beat = stream.reply()
        assert beat.request_id == 1 and beat.heartbeat.lease_deadline_unix_ms >= task.lease_deadline_unix_ms

        stream.report(2, complete=worker_pb2.CompleteTaskRequest(token=task.token, outputs_json="[1]"))
        refused = stream.reply()
        assert refused.request_id == 2 and refused.WhichOneof("result") == "error"
        assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "outputs_json" in refused.error.message

        stream.report(3, fail=worker_pb2.FailTaskRequest(token=task.token, error_message="it broke"))
        failed = stream.reply()
        assert failed.request_id == 3 and failed.WhichOneof("result") == "fail" and not failed.fail.will_retry

        stream.report(4, complete=worker_pb2.CompleteTaskRequest(token=task.token, outputs_json="{}"))
        stale = stream.reply()
        assert stale.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], stale
        assert client.wait(pipeline_id, timeout=10)["state"] == "FAILED"
        assert client.get_node_data(pipeline_id, "a0")["ex_data"] == "it broke"
    finally:
        stream.close()


def test_a_token_from_a_closed_stream_still_reports_through_the_unary_call(
    server: ServerProcess, client: EngineClient
) -> None:
    pipeline_id = client.start(chain_tree(["streamed"]))
    stream = RawStream(server.address, "streamed")
    stream.send(credit=1)
    task = stream.task()
    stream.close()
    with grpc.insecure_channel(server.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        stub.CompleteTask(worker_pb2.CompleteTaskRequest(token=task.token, outputs_json='{"late": true}'), timeout=10)
    assert client.wait(pipeline_id, timeout=10)["state"] == "FINISHED"


def test_a_stream_that_does_not_start_with_hello_is_refused(server: ServerProcess) -> None:
    stream = RawStream(server.address)
    try:
        stream.send(credit=5)
        with pytest.raises(grpc.RpcError) as refused:
            stream.receive()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hello" in (refused.value.details() or "")
    finally:
        stream.close()


def test_tasks_claimed_for_a_stream_that_went_away_are_offered_again_at_once(
    server: ServerProcess, client: EngineClient
) -> None:
    """Credit granted, then the worker vanishes: the task is not left to its 3 s lease."""
    stream = RawStream(server.address, "streamed")
    stream.send(credit=1)
    stream.close()
    pipeline_id = client.start(chain_tree(["streamed"]))

    @component("streamed")
    def streamed() -> dict[str, str]:
        return {"by": "the second worker"}

    with Worker(server.address, [streamed], transport="stream"):
        state = client.wait(pipeline_id, timeout=10)
    assert state["state"] == "FINISHED"
    assert client.get_node_data(pipeline_id, "a0")["outputs"]["by"] == "the second worker"


@pytest.mark.parametrize("transport", ["stream", "poll"])
def test_the_python_worker_runs_a_chain_on_either_transport(
    server: ServerProcess, client: EngineClient, transport: str
) -> None:
    @component("streamed")
    def streamed(n: int = 0) -> dict[str, int]:
        return {"n": n + 1}

    tree = chain_tree(["streamed"] * 20)
    with Worker(server.address, [streamed], transport=transport, concurrency=4):  # type: ignore[arg-type]
        state = client.wait(client.start(tree), timeout=30)
    assert state["state"] == "FINISHED"
    assert all(child["state"] == "FINISHED" for child in state["children"].values())


def test_tasks_too_big_for_one_message_arrive_over_several(database_url: str, tmp_path: Path) -> None:
    """Credit for 12 tasks of ~95 kB each, against a 1.1 MB message limit: all of them arrive, none is lost."""
    server = ServerProcess(
        database_url,
        log_dir=tmp_path,
        extra_args=["--max-payload-bytes", "100000", "--max-tree-bytes", "100000"],
    )
    server.start()
    try:
        with EngineClient(server.address) as client:
            big = "x" * 95_000
            ids = {
                client.start(chain_tree(["streamed"], inputs={"blob": {"type": "plain", "value": big}}))
                for _ in range(12)
            }
        stream = RawStream(server.address, "streamed")
        try:
            stream.send(credit=12)
            tasks = [stream.task() for _ in range(12)]
            assert {task.pipeline_id for task in tasks} == ids
            assert all(task.attempt == 1 and len(task.inputs_json) > 95_000 for task in tasks)
        finally:
            stream.close()
    finally:
        server.stop()


def test_a_report_that_cannot_be_read_is_answered_and_the_stream_goes_on(
    server: ServerProcess, client: EngineClient
) -> None:
    pipeline_id = client.start(chain_tree(["streamed"]))
    stream = RawStream(server.address, "streamed")
    try:
        stream.send(credit=1)
        task = stream.task()
        stream.report(1, complete=worker_pb2.CompleteTaskRequest(token=task.token, outputs_json="[" * 100_000))
        refused = stream.reply()
        assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "nested too deeply" in refused.error.message
        stream.report(2, complete=worker_pb2.CompleteTaskRequest(token=task.token, outputs_json='{"ok": true}'))
        assert stream.reply().WhichOneof("result") == "complete"
        assert client.wait(pipeline_id, timeout=10)["state"] == "FINISHED"
    finally:
        stream.close()


def test_closing_the_worker_side_still_delivers_every_reply(server: ServerProcess, client: EngineClient) -> None:
    client.start(chain_tree(["streamed"]))
    stream = RawStream(server.address, "streamed")
    stream.send(credit=1)
    task = stream.task()
    stream.report(1, heartbeat=worker_pb2.HeartbeatRequest(token=task.token))
    stream.report(2, complete=worker_pb2.CompleteTaskRequest(token=task.token, outputs_json="{}"))
    stream.outgoing.put(None)  # half-close: no more requests
    replies = {stream.reply().request_id for _ in range(2)}
    assert replies == {1, 2}
    stream.reader.join(timeout=10)
    assert not stream.reader.is_alive(), "the server did not end the stream after answering"
    stream.channel.close()


def test_a_stream_waiting_without_credit_ends_at_once_when_the_server_stops(database_url: str, tmp_path: Path) -> None:
    server = ServerProcess(database_url, log_dir=tmp_path)
    server.start()
    stream = RawStream(server.address, "streamed")
    try:
        assert stream.nothing_within(0.3)
        began = time.monotonic()
        server.stop()
        with pytest.raises(grpc.RpcError) as ended:
            stream.receive(timeout=10)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - began < 4, "the stream waited for gRPC's shutdown grace instead of ending"
    finally:
        stream.close()
