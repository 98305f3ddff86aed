"""Components without a server: input binding, result types, failure messages, task context,
worker registration, the error map and the protobuf conversion."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc
import pytest

from engine_api.engine.v1 import types_pb2, worker_pb2
from worker_sdk import (
    AwaitCallback,
    Component,
    Done,
    PollAgain,
    RetryableError,
    TaskCancelled,
    TaskContext,
    TaskKind,
    Worker,
    component,
    current_task,
    errors,
)
from worker_sdk._executor import TaskExecutor
from worker_sdk._heartbeat import HeartbeatManager
from worker_sdk._models import HeartbeatReply, Task
from worker_sdk._threads import DaemonThreadPool, EventLoopThread
from worker_sdk._transport import decode_json_object, encode_json, task_from_proto
from worker_sdk.component import Failure, format_exception, invoke, invoke_async


def run(target: Component, inputs: dict[str, Any] | None = None, **context: Any) -> Any:
    ctx = TaskContext(inputs=inputs or {}, **context)
    if target.is_async(ctx.kind):
        return asyncio.run(invoke_async(target, ctx))
    return invoke(target, ctx)


# --- function components: binding -----------------------------------------------------------------


@component("add")
def add(a: int, b: int = 10) -> dict[str, int]:
    return {"sum": a + b}


@component("collect", version="v2")
def collect(first: str, **rest: Any) -> dict[str, Any]:
    return {"first": first, "rest": rest}


def test_inputs_bind_by_name_and_extra_inputs_are_ignored() -> None:
    assert run(add, {"a": 1, "b": 2, "unused": 3}) == Done({"sum": 3})


def test_parameters_with_defaults_are_optional() -> None:
    assert run(add, {"a": 1}) == Done({"sum": 11})


def test_kwargs_parameter_receives_the_other_inputs() -> None:
    assert run(collect, {"first": "x", "y": 1, "z": [2]}) == Done({"first": "x", "rest": {"y": 1, "z": [2]}})


def test_missing_required_input_fails_the_task_naming_it() -> None:
    outcome = run(add, {"b": 2})

    assert isinstance(outcome, Failure)
    assert outcome.message == "TypeError: component 'add' is missing required input 'a'"
    assert not outcome.retryable


def test_several_missing_inputs_are_all_named() -> None:
    @component("pair")
    def pair(left: int, right: int) -> None:
        return None

    outcome = run(pair, {})

    assert isinstance(outcome, Failure)
    assert outcome.message == "TypeError: component 'pair' is missing required inputs 'left', 'right'"


def test_positional_only_parameter_is_refused_at_declaration() -> None:
    def positional(a: int, /) -> None:
        return None

    with pytest.raises(TypeError, match="'a' is positional-only"):
        component("positional")(positional)


def test_decorated_function_stays_callable_and_described() -> None:
    assert add(1, b=1) == {"sum": 2}
    assert add.__name__ == "add"
    assert add.code == "add"
    assert add.version == "legacy"
    assert collect.version == "v2"
    assert "add" in repr(add)


def test_empty_code_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty code"):
        component("")


# --- results ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        (None, Done()),
        ({"x": 1}, Done({"x": 1})),
        (Done({"y": 2}), Done({"y": 2})),
        (PollAgain(after_ms=500, outputs={"job": "j1"}), PollAgain(after_ms=500, outputs={"job": "j1"})),
        (AwaitCallback(outputs={"ticket": 7}), AwaitCallback(outputs={"ticket": 7})),
    ],
)
def test_return_values_become_results(returned: Any, expected: Any) -> None:
    @component("returns")
    def returns() -> Any:
        return returned

    assert run(returns) == expected


def test_unsupported_return_value_fails_the_task() -> None:
    @component("bad_return")
    def bad_return() -> int:
        return 42

    outcome = run(bad_return)

    assert isinstance(outcome, Failure)
    assert outcome.message.startswith("TypeError: component 'bad_return' returned int;")


def test_exception_becomes_failure_with_class_name() -> None:
    @component("raises")
    def raises() -> None:
        raise ValueError("bad input")

    outcome = run(raises)

    assert outcome == Failure("ValueError: bad input")
    assert isinstance(outcome.exception, ValueError)


def test_exception_without_message_is_reported_by_class_name() -> None:
    assert format_exception(KeyError()) == "KeyError"
    assert format_exception(RuntimeError("boom")) == "RuntimeError: boom"


def test_retryable_error_fails_as_retryable() -> None:
    @component("flaky")
    def flaky() -> None:
        raise RetryableError("service busy", retry_after_ms=1500)

    assert run(flaky) == Failure("service busy", retryable=True, retry_after_ms=1500)


def test_result_types_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PollAgain(after_ms=0)
    with pytest.raises(ValueError, match="retry_after_ms"):
        RetryableError("x", retry_after_ms=-1)


# --- async and class components --------------------------------------------------------------------


@component("async_add")
async def async_add(a: int, b: int) -> dict[str, int]:
    await asyncio.sleep(0)
    return {"sum": a + b, "node": current_task().node_id}  # type: ignore[dict-item]


def test_async_function_component() -> None:
    assert async_add.is_async(TaskKind.EXECUTE)
    assert run(async_add, {"a": 2, "b": 3}, node_id="n1") == Done({"sum": 5, "node": "n1"})


def test_async_component_called_synchronously_fails_cleanly() -> None:
    # The coroutine must be closed: an un-awaited coroutine warning would be an error in this suite.
    outcome = invoke(async_add, TaskContext(inputs={"a": 1, "b": 1}))

    assert isinstance(outcome, Failure)
    assert "declare it with `async def`" in outcome.message


class JobPoller(Component):
    code = "job_poller"
    version = "v1"

    def execute(self, inputs: dict[str, Any], ctx: TaskContext) -> PollAgain:
        return PollAgain(after_ms=100, outputs={"job": inputs["job"]})

    async def schedule(self, inputs: dict[str, Any], ctx: TaskContext) -> Done | PollAgain:
        if ctx.callback_data is None:
            return PollAgain(after_ms=100)
        return Done({"job": ctx.outputs["job"], "result": ctx.callback_data, "runs": ctx.schedule_times})


def test_class_component_execute_and_schedule() -> None:
    poller = JobPoller()

    assert not poller.is_async(TaskKind.EXECUTE)
    assert poller.is_async(TaskKind.SCHEDULE)
    assert run(poller, {"job": "j1"}) == PollAgain(after_ms=100, outputs={"job": "j1"})
    assert run(
        poller, kind=TaskKind.SCHEDULE, outputs={"job": "j1"}, callback_data={"ok": True}, schedule_times=2
    ) == Done({"job": "j1", "result": {"ok": True}, "runs": 2})


def test_class_component_without_schedule_fails_schedule_tasks() -> None:
    class OneShot(Component):
        code = "one_shot"

        def execute(self, inputs: dict[str, Any], ctx: TaskContext) -> None:
            return None

    outcome = run(OneShot(), kind=TaskKind.SCHEDULE)

    assert isinstance(outcome, Failure)
    assert outcome.message.startswith("NotImplementedError: component 'one_shot' (OneShot) was asked to schedule")


def test_function_component_serves_schedule_tasks_too() -> None:
    @component("kind_echo")
    def kind_echo() -> dict[str, str]:
        return {"kind": current_task().kind.value}

    assert run(kind_echo, kind=TaskKind.SCHEDULE) == Done({"kind": "schedule"})


def test_component_cannot_change_the_task_inputs() -> None:
    class Mutator(Component):
        code = "mutator"

        def execute(self, inputs: dict[str, Any], ctx: TaskContext) -> None:
            inputs["added"] = True

    ctx = TaskContext(inputs={"a": 1})
    invoke(Mutator(), ctx)

    assert dict(ctx.inputs) == {"a": 1}


# --- task context ----------------------------------------------------------------------------------


def test_current_task_is_set_during_the_call_only() -> None:
    seen: list[TaskContext] = []

    @component("spy")
    def spy() -> None:
        seen.append(current_task())

    ctx = TaskContext(task_id="t1")
    invoke(spy, ctx)

    assert seen == [ctx]
    with pytest.raises(RuntimeError, match="outside of a running component"):
        current_task()


def test_current_task_reaches_helper_threads_and_asyncio_tasks() -> None:
    @component("nested")
    async def nested() -> dict[str, str]:
        in_thread = await asyncio.to_thread(lambda: current_task().task_id)
        in_task = await asyncio.create_task(asyncio.sleep(0, result=current_task().task_id))
        return {"thread": in_thread, "task": in_task}

    assert run(nested, task_id="t9") == Done({"thread": "t9", "task": "t9"})


def test_concurrent_tasks_see_their_own_context() -> None:
    results: dict[str, str] = {}

    @component("who")
    def who() -> None:
        time.sleep(0.01)
        results[threading.current_thread().name] = current_task().task_id

    threads = [
        threading.Thread(target=invoke, args=(who, TaskContext(task_id=f"t{i}")), name=f"t{i}") for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == {f"t{i}": f"t{i}" for i in range(4)}


def test_heartbeat_and_cancellation() -> None:
    progress: list[Any] = []
    ctx = TaskContext(task_id="t1", node_id="n1", on_heartbeat=progress.append)

    ctx.heartbeat({"done": 1})
    ctx.heartbeat()
    ctx.raise_if_cancelled()
    assert not ctx.is_cancelled()

    ctx.cancelled.set()

    assert progress == [{"done": 1}, None]
    assert ctx.is_cancelled()
    with pytest.raises(TaskCancelled, match="task t1 of node n1 was cancelled"):
        ctx.raise_if_cancelled()


# --- worker registration (no connection is made) ---------------------------------------------------


def test_worker_registers_functions_classes_and_instances() -> None:
    worker = Worker("localhost:1", [add, collect, JobPoller], worker_id="w1")
    with_instance = Worker("localhost:1", [JobPoller()])

    assert worker.component_codes == ("add", "collect", "job_poller")
    assert with_instance.component_codes == ("job_poller",)
    assert worker.worker_id == "w1"
    assert not worker.running


def test_worker_serves_several_versions_of_a_code() -> None:
    @component("add", version="v2")
    def add_v2(a: int) -> None:
        return None

    assert Worker("localhost:1", [add, add_v2]).component_codes == ("add",)


@pytest.mark.parametrize(
    ("components", "error", "match"),
    [
        ([], ValueError, "at least one component"),
        ([add, add], ValueError, "'add' version 'legacy' is registered twice"),
        ([print], TypeError, "is not a component"),
        ([type("NoCode", (Component,), {})], TypeError, "NoCode needs a non-empty `code`"),
    ],
)
def test_worker_refuses_bad_component_lists(components: list[Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Worker("localhost:1", components)


def test_worker_refuses_bad_options() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        Worker("localhost:1", [add], concurrency=0)
    with pytest.raises(ValueError, match="heartbeat_interval"):
        Worker("localhost:1", [add], heartbeat_interval=0)


# --- error map -------------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("status", "error_class", "transient"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, False),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound, False),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition, False),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists, False),
        (grpc.StatusCode.UNIMPLEMENTED, errors.Unimplemented, False),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable, True),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied, False),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded, True),
        (grpc.StatusCode.INTERNAL, errors.EngineError, False),
    ],
)
def test_status_codes_map_to_typed_errors(
    status: grpc.StatusCode, error_class: type[errors.EngineError], transient: bool
) -> None:
    error = errors.from_rpc_error(FakeRpcError(status, "node n1 is RUNNING"))

    assert type(error) is error_class
    assert error.code == status.name
    assert error.message == "node n1 is RUNNING"
    assert str(error) == f"{status.name}: node n1 is RUNNING"
    assert errors.is_transient(error) is transient
    assert errors.is_transient(status) is transient


# --- protobuf conversion ---------------------------------------------------------------------------


def test_task_conversion_parses_json_payloads() -> None:
    message = worker_pb2.Task(
        task_id="t1",
        token="tok",
        pipeline_id="p1",
        node_id="n1",
        node_version="v7",
        component_code="add",
        kind=types_pb2.TASK_KIND_SCHEDULE,
        inputs_json='{"a": 1, "text": "héllo"}',
        outputs_json='{"kept": true}',
        callback_data_json="[1, 2]",
        attempt=2,
        loop=3,
        inner_loop=1,
        retry=1,
        schedule_times=4,
        lease_deadline_unix_ms=1_700_000_000_500,
    )

    task = task_from_proto(message)

    assert task.kind is TaskKind.SCHEDULE
    assert task.component_version == "legacy"
    assert task.inputs == {"a": 1, "text": "héllo"}
    assert task.outputs == {"kept": True}
    assert task.callback_data == [1, 2]
    assert (task.attempt, task.loop, task.retry, task.schedule_times) == (2, 3, 1, 4)
    assert task.lease_deadline == 1_700_000_000.5
    assert task.payload_error is None


def test_task_conversion_reports_unreadable_payloads() -> None:
    task = task_from_proto(worker_pb2.Task(token="tok", inputs_json="[1]", callback_data_json="{oops"))

    assert task.inputs == {}
    assert task.callback_data is None
    assert task.payload_error is not None
    assert "inputs must be a JSON object" in task.payload_error
    assert "callback data is not valid JSON" in task.payload_error


def test_json_is_compact_and_keeps_non_ascii_text() -> None:
    assert encode_json({"name": "张三", "n": [1, 2]}) == '{"name":"张三","n":[1,2]}'
    assert decode_json_object("", "inputs") == {}
    with pytest.raises(ValueError, match="must be a JSON object"):
        decode_json_object("3", "inputs")


# --- reporting through a fake transport ------------------------------------------------------------


class FakeTransport:
    """Stands in for WorkerTransport; `fail_next` errors are raised by the next report calls."""

    def __init__(self, *fail_next: errors.EngineError) -> None:
        self.fail_next = list(fail_next)
        self.calls: list[tuple[str, Any]] = []
        self.done = threading.Event()

    def _maybe_fail(self, name: str) -> None:
        if self.fail_next:
            error = self.fail_next.pop(0)
            self.calls.append((name + "!", error.code))
            raise error

    def send_report(self, kind: str, request: Any, timeout: float) -> Any:
        self._maybe_fail(kind)
        if kind == "complete":
            self.calls.append(
                (
                    "complete",
                    (request.token, json.loads(request.outputs_json), request.poll_after_ms, request.await_callback),
                )
            )
            return worker_pb2.CompleteTaskResponse()
        self.calls.append(("fail", (request.token, request.error_message, request.retryable)))
        return worker_pb2.FailTaskResponse()

    def heartbeat(self, token: str, *, progress_json: str = "", timeout: float) -> HeartbeatReply:
        return HeartbeatReply(lease_deadline=None, cancel_requested=False, cancel_reason="")


def make_task(code: str, inputs: dict[str, Any], token: str = "tok1") -> Task:
    return Task(
        task_id="t1",
        token=token,
        pipeline_id="p1",
        node_id="n1",
        node_version="v1",
        component_code=code,
        component_version="legacy",
        kind=TaskKind.EXECUTE,
        inputs=inputs,
        attempt=1,
        loop=1,
        inner_loop=1,
        retry=0,
        schedule_times=0,
        callback_data=None,
        outputs={},
        lease_deadline=time.time() + 30,
    )


def make_executor(
    transport: FakeTransport,
    pool: DaemonThreadPool,
    on_finished: Callable[[], None],
    *components: Component,
    report_loop: EventLoopThread | None = None,
) -> TaskExecutor:
    return TaskExecutor(
        components={(c.code, c.version): c for c in components},
        transport=transport,  # type: ignore[arg-type]
        heartbeats=HeartbeatManager(transport, fixed_interval=10.0, rpc_timeout=1.0),  # type: ignore[arg-type]
        pool=pool,
        event_loop=None,
        worker_id="w1",
        rpc_timeout=1.0,
        report_timeout=5.0,
        on_finished=on_finished,
        report_loop=report_loop,
    )


def execute_one(transport: FakeTransport, task: Task, *components: Component) -> None:
    finished = threading.Event()
    pool = DaemonThreadPool(2, thread_name_prefix="test")
    executor = make_executor(transport, pool, finished.set, *components)
    executor.submit(task)
    assert finished.wait(5.0)
    pool.shutdown()


def test_transient_report_errors_are_retried() -> None:
    transport = FakeTransport(errors.Unavailable("restarting"))

    execute_one(transport, make_task("add", {"a": 1}), add)

    assert transport.calls == [("complete!", "UNAVAILABLE"), ("complete", ("tok1", {"sum": 11}, 0, False))]


def test_stale_token_drops_the_result_without_retrying() -> None:
    transport = FakeTransport(errors.FailedPrecondition("stale token"))

    execute_one(transport, make_task("add", {"a": 1}), add)

    assert transport.calls == [("complete!", "FAILED_PRECONDITION")]


def test_outputs_that_are_not_json_fail_the_task() -> None:
    @component("unserialisable")
    def unserialisable() -> dict[str, Any]:
        return {"when": object()}

    transport = FakeTransport()

    execute_one(transport, make_task("unserialisable", {}), unserialisable)

    [(name, (token, message, retryable))] = transport.calls
    assert (name, token, retryable) == ("fail", "tok1", False)
    assert message.startswith("the outputs are not JSON-serialisable: TypeError:")


def test_refused_outputs_are_replaced_by_a_failure() -> None:
    transport = FakeTransport(errors.InvalidArgument("outputs_json is over the 1 MiB limit"))

    execute_one(transport, make_task("add", {"a": 1}), add)

    assert transport.calls == [
        ("complete!", "INVALID_ARGUMENT"),
        ("fail", ("tok1", "the engine refused the outputs: outputs_json is over the 1 MiB limit", False)),
    ]


def test_task_for_an_unknown_component_version_fails() -> None:
    transport = FakeTransport()
    task = make_task("add", {"a": 1})
    task = Task(**{**task.__dict__, "component_version": "v9"})

    execute_one(transport, task, add)

    [(name, (_, message, _))] = transport.calls
    assert name == "fail"
    assert message == "LookupError: worker w1 has no component 'add' version 'v9' (versions served: 'legacy')"


def test_failure_report_carries_the_message() -> None:
    @component("broken")
    def broken(n: int) -> None:
        raise ValueError(f"bad input {n}")

    transport = FakeTransport()

    execute_one(transport, make_task("broken", {"n": 3}), broken)

    assert transport.calls == [("fail", ("tok1", "ValueError: bad input 3", False))]
    assert json.dumps(transport.calls)  # plain data only


def test_a_task_due_sooner_than_the_sleeping_heartbeat_thread_is_heartbeated_in_time() -> None:
    """The heartbeat thread is woken only for a heartbeat earlier than its own wake-up: one due later waits
    for it, one due sooner must still go out on time."""
    sent: list[tuple[str, float]] = []

    class RecordingTransport(FakeTransport):
        def heartbeat(self, token: str, *, progress_json: str = "", timeout: float) -> HeartbeatReply:
            sent.append((token, time.monotonic()))
            return HeartbeatReply(lease_deadline=None, cancel_requested=False, cancel_reason="")

    heartbeats = HeartbeatManager(RecordingTransport(), fixed_interval=None, rpc_timeout=1.0)  # type: ignore[arg-type]
    heartbeats.start()
    try:
        long_lease = replace(make_task("add", {}, token="long"), lease_deadline=time.time() + 60)  # due in 20 s
        heartbeats.track(long_lease, TaskContext(task_id="t1"))
        time.sleep(0.1)  # the thread now sleeps until the long lease's heartbeat
        tracked_at = time.monotonic()
        short_lease = replace(make_task("add", {}, token="short"), lease_deadline=time.time() + 0.9)  # due in 0.3 s
        heartbeats.track(short_lease, TaskContext(task_id="t2"))
        deadline = time.monotonic() + 3
        while not sent and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        heartbeats.stop()
    assert sent, "the short lease was never heartbeated"
    token, at = sent[0]
    assert token == "short"
    assert at - tracked_at < 1.0


def test_a_result_that_arrives_after_the_report_loop_stopped_is_dropped_and_its_slot_freed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = FakeTransport()
    finished = threading.Event()
    report_loop = EventLoopThread("test-stream")
    report_loop.start()
    report_loop.stop()  # the worker is past its shutdown
    pool = DaemonThreadPool(2, thread_name_prefix="test")
    executor = make_executor(transport, pool, finished.set, add, report_loop=report_loop)
    executor.submit(make_task("add", {"a": 1}))
    assert finished.wait(5.0)
    pool.shutdown()
    assert transport.calls == []
    assert "finished after the worker shut down; result dropped" in caplog.text


def test_a_result_handed_over_as_the_report_loop_stops_still_frees_its_slot() -> None:
    """The loop takes the hand-over and stops in the same turn: the report task it created is cancelled before
    its first step, and must still finish the task (a cold review found it did not)."""
    transport = FakeTransport()
    finished = threading.Event()
    report_loop = EventLoopThread("test-stream")
    report_loop.start()
    release_loop = threading.Event()
    report_loop.call_soon(release_loop.wait)  # holds the loop while the hand-over and the stop queue up
    pool = DaemonThreadPool(2, thread_name_prefix="test")
    executor = make_executor(transport, pool, finished.set, add, report_loop=report_loop)
    executor.submit(make_task("add", {"a": 1}))
    time.sleep(0.3)  # the component ran and handed its outcome over
    stopper = threading.Thread(target=report_loop.stop)
    stopper.start()
    time.sleep(0.1)
    release_loop.set()
    stopper.join(5.0)
    pool.shutdown()
    assert finished.wait(5.0)
