"""gRPC servicers: convert the request, call the engine, convert the answer. Nothing else lives here."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from engine_api.engine.v1 import engine_pb2, engine_pb2_grpc, worker_pb2, worker_pb2_grpc
from engine_server import converters
from engine_server.core.decide import (
    Callback,
    Event,
    ForceFail,
    PauseNode,
    PausePipeline,
    ResumeNode,
    ResumePipeline,
    RetryNode,
    RetrySubprocess,
    RevokePipeline,
    SkipConditionalParallelGateway,
    SkipExclusiveGateway,
    SkipNode,
)
from engine_server.core.model import PipelineState
from engine_server.core.tree import Problem, TreeError, check_variables, load_tree_json, parse_tree
from engine_server.engine import ClaimedTask, Engine, HeartbeatResult, ReportResult, TaskFeed
from engine_server.errors import (
    AlreadyExists,
    EngineError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from engine_server.logs import request_ids
from engine_server.records import parse_json_object
from engine_server.settings import Settings

log = logging.getLogger("engine_server.rpc")

# The one error map of the server boundary.
STATUS_CODES: dict[type[EngineError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Internal: grpc.StatusCode.INTERNAL,
}

# Most pipelines one StartPipelines call may start (as the proto documents).
MAX_STARTS_PER_CALL = 1000

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def maps_errors(method: Handler[Request, Response]) -> Handler[Request, Response]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except EngineError as exc:
            code = STATUS_CODES.get(type(exc), grpc.StatusCode.INTERNAL)
            await context.abort(code, str(exc))
        except Exception:
            log.exception("%s failed", method.__name__, extra=request_ids(request))
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed inside the engine; see its log")
        raise AssertionError("context.abort returns by raising")

    return wrapper


def max_message_bytes(settings: Settings) -> int:
    """gRPC's message limit: room for the largest tree or payload plus framing."""
    return max(settings.max_tree_bytes, settings.max_payload_bytes) + 1024 * 1024


class Limits:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def payload(self, text: str, what: str) -> None:
        size = len(text.encode()) if len(text) * 4 > self.settings.max_payload_bytes else len(text)
        if size > self.settings.max_payload_bytes:
            raise InvalidArgument(
                f"{what} is {size} bytes, over the server's limit of {self.settings.max_payload_bytes} bytes "
                "(--max-payload-bytes)"
            )

    def json_value(self, text: str, what: str) -> Any:
        self.payload(text, what)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidArgument(f"{what} is nested too deeply to read") from None

    def json_object(self, text: str, what: str) -> dict[str, Any]:
        self.payload(text, what)
        try:
            return dict(parse_json_object(text, what))
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        except RecursionError:
            raise InvalidArgument(f"{what} is nested too deeply to read") from None


def _variable_key(name: str) -> str:
    """Start inputs may be keyed "name" or "${name}"; variables are always keyed "${name}"."""
    return name if name.startswith("${") and name.endswith("}") else f"${{{name}}}"


def _required(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is required")
    return value


class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.limits = Limits(settings)

    def _parse_tree(self, tree_json: str, cycle_tolerate: bool) -> Any:
        if not tree_json:
            raise InvalidArgument("tree_json is required (or template_id)")
        if len(tree_json) > self.settings.max_tree_bytes:
            raise InvalidArgument(
                f"the tree is {len(tree_json)} bytes, over the limit of {self.settings.max_tree_bytes} bytes "
                "(--max-tree-bytes)"
            )
        # Pipelines started from one tree share its parsed, validated spec.
        cached = self.engine.specs.find(tree_json, cycle_tolerate=cycle_tolerate)
        return cached or parse_tree(load_tree_json(tree_json), cycle_tolerate=cycle_tolerate)

    @maps_errors
    async def StartPipeline(
        self, request: engine_pb2.StartPipelineRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.StartPipelineResponse:
        pipeline_id, created = await self._enqueue_start(request)
        return engine_pb2.StartPipelineResponse(pipeline_id=pipeline_id, created=created)

    @maps_errors
    async def StartPipelines(
        self, request: engine_pb2.StartPipelinesRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.StartPipelinesResponse:
        count = len(request.pipelines)
        if not count:
            raise InvalidArgument("pipelines is empty: send at least one StartPipelineRequest")
        if count > MAX_STARTS_PER_CALL:
            raise InvalidArgument(
                f"{count} pipelines in one StartPipelines call, over the limit of {MAX_STARTS_PER_CALL}: "
                "split them over several calls"
            )
        if self.engine.stopping:
            raise Unavailable("the engine server is shutting down; retry on another")
        # Every item is queued before any is awaited, so they share the engine's next transactions. Once one is
        # queued it will start whatever happens to the others, so an item's failure stays in its own result.
        outcomes: list[asyncio.Future[tuple[str, bool]] | BaseException] = []
        for item in request.pipelines:
            try:
                outcomes.append(self._enqueue_start(item))
            except Exception as exc:
                outcomes.append(exc)
        queued = [outcome for outcome in outcomes if isinstance(outcome, asyncio.Future)]
        answers = iter(await asyncio.gather(*queued, return_exceptions=True))
        response = engine_pb2.StartPipelinesResponse()
        for outcome in outcomes:
            answer = next(answers) if isinstance(outcome, asyncio.Future) else outcome
            result = response.results.add()
            if isinstance(answer, BaseException):
                _set_error(result.error, answer, what="starting this pipeline")
            else:
                result.started.pipeline_id, result.started.created = answer
        return response

    def _enqueue_start(self, request: engine_pb2.StartPipelineRequest) -> asyncio.Future[tuple[str, bool]]:
        """Checks one start request as StartPipeline does and queues it; raises EngineError if it is refused."""
        if request.template_id:
            raise Unimplemented("starting a registered template is not implemented by this engine version yet")
        try:
            spec = self._parse_tree(request.tree_json, request.cycle_tolerate)
        except TreeError as exc:
            raise (Unimplemented if exc.unsupported_only else InvalidArgument)(str(exc)) from None
        inputs = self.limits.json_object(request.inputs_json, "inputs_json")
        problems = check_variables(spec, inputs)
        if problems:
            raise InvalidArgument(str(TreeError(problems)))
        if request.start_node_id and request.start_node_id not in spec.nodes:
            raise InvalidArgument(f"start_node_id {request.start_node_id!r} is not a node of the root pipeline")
        return self.engine.enqueue_start(
            tree_json=request.tree_json,
            spec=spec,
            presets={_variable_key(key): value for key, value in inputs.items()},
            pipeline_id=request.pipeline_id,
            idempotency_key=request.idempotency_key,
            start_node_id=request.start_node_id,
            cycle_tolerate=request.cycle_tolerate,
            timeout_ms=max(0, request.timeout_ms),
            failure_handler=request.failure_handler,
        )

    @maps_errors
    async def ValidatePipeline(
        self, request: engine_pb2.ValidatePipelineRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.ValidatePipelineResponse:
        inputs = self.limits.json_object(request.inputs_json, "inputs_json")
        problems: list[Problem]
        try:
            problems = check_variables(self._parse_tree(request.tree_json, request.cycle_tolerate), inputs)
        except TreeError as exc:
            problems = exc.problems
        return engine_pb2.ValidatePipelineResponse(
            valid=not problems,
            problems=[
                engine_pb2.ValidationProblem(code=p.code, message=p.message, node_id=p.node_id, flow_id=p.flow_id)
                for p in problems
            ],
        )

    @maps_errors
    async def GetState(
        self, request: engine_pb2.GetStateRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.GetStateResponse:
        view = await self.engine.get_pipeline(_required(request.pipeline_id, "pipeline_id"))
        return converters.state_tree(view)

    @maps_errors
    async def GetNodeData(
        self, request: engine_pb2.NodeTarget, context: grpc.aio.ServicerContext
    ) -> engine_pb2.NodeData:
        run = await self.engine.get_node(
            _required(request.pipeline_id, "pipeline_id"), _required(request.node_id, "node_id")
        )
        return converters.node_data(request.pipeline_id, run)

    @maps_errors
    async def GetNodeHistories(
        self, request: engine_pb2.NodeTarget, context: grpc.aio.ServicerContext
    ) -> engine_pb2.GetNodeHistoriesResponse:
        runs = await self.engine.get_histories(
            _required(request.pipeline_id, "pipeline_id"), _required(request.node_id, "node_id")
        )
        return engine_pb2.GetNodeHistoriesResponse(histories=[converters.node_history(r) for r in runs])

    @maps_errors
    async def ListPipelines(
        self, request: engine_pb2.ListPipelinesRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.ListPipelinesResponse:
        page_size = min(request.page_size or 100, 1000)
        after = None
        if request.page_token:
            created_at, _, pipeline_id = request.page_token.partition(":")
            if not created_at.isdigit() or not pipeline_id:
                raise InvalidArgument("page_token is malformed: pass next_page_token back unchanged")
            after = (int(created_at), pipeline_id)
        states = []
        for number in request.states:
            if number not in converters.PIPELINE_STATES_BY_NUMBER:
                raise InvalidArgument(f"unknown pipeline state {number} in states")
            states.append(converters.PIPELINE_STATES_BY_NUMBER[number].value)
        store = self.engine.store
        rows = await self.engine.read(
            lambda conn: store.list_pipelines(conn, states=states, limit=page_size, after=after)
        )
        response = engine_pb2.ListPipelinesResponse(
            pipelines=[
                engine_pb2.PipelineSummary(
                    pipeline_id=row.id,
                    state=converters.PIPELINE_STATES[PipelineState(row.state)],
                    name=row.name,
                    created_unix_ms=row.created_at,
                    finished_unix_ms=row.finished_at,
                )
                for row in rows
            ]
        )
        if len(rows) == page_size:
            response.next_page_token = f"{rows[-1].created_at}:{rows[-1].id}"
        return response

    @maps_errors
    async def PurgePipelines(
        self, request: engine_pb2.PurgePipelinesRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.PurgePipelinesResponse:
        if request.finished_before_unix_ms <= 0:
            raise InvalidArgument("finished_before_unix_ms is required")
        purged = await self.engine.purge(request.finished_before_unix_ms, request.batch_size)
        return engine_pb2.PurgePipelinesResponse(purged=purged)

    # ---------------------------------------------------------------- control operations

    async def _control(self, pipeline_id: str, event: Event) -> engine_pb2.OperationResponse:
        changed = await self.engine.control(_required(pipeline_id, "pipeline_id"), event)
        return engine_pb2.OperationResponse(changed=changed)

    @maps_errors
    async def PausePipeline(
        self, request: engine_pb2.PipelineTarget, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        return await self._control(request.pipeline_id, PausePipeline(request.subprocess_id))

    @maps_errors
    async def ResumePipeline(
        self, request: engine_pb2.PipelineTarget, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        return await self._control(request.pipeline_id, ResumePipeline(request.subprocess_id))

    @maps_errors
    async def RevokePipeline(
        self, request: engine_pb2.PipelineTarget, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        return await self._control(request.pipeline_id, RevokePipeline(request.subprocess_id))

    @maps_errors
    async def PauseNode(
        self, request: engine_pb2.NodeTarget, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        return await self._control(request.pipeline_id, PauseNode(_required(request.node_id, "node_id")))

    @maps_errors
    async def ResumeNode(
        self, request: engine_pb2.NodeTarget, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        return await self._control(request.pipeline_id, ResumeNode(_required(request.node_id, "node_id")))

    @maps_errors
    async def RetryNode(
        self, request: engine_pb2.RetryNodeRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        inputs = self.limits.json_object(request.inputs_json, "inputs_json") if request.inputs_json else None
        return await self._control(request.pipeline_id, RetryNode(_required(request.node_id, "node_id"), inputs))

    @maps_errors
    async def RetrySubprocess(
        self, request: engine_pb2.NodeTarget, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        return await self._control(request.pipeline_id, RetrySubprocess(_required(request.node_id, "node_id")))

    @maps_errors
    async def SkipNode(
        self, request: engine_pb2.NodeTarget, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        return await self._control(request.pipeline_id, SkipNode(_required(request.node_id, "node_id")))

    @maps_errors
    async def SkipExclusiveGateway(
        self, request: engine_pb2.SkipExclusiveGatewayRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        event = SkipExclusiveGateway(_required(request.node_id, "node_id"), _required(request.flow_id, "flow_id"))
        return await self._control(request.pipeline_id, event)

    @maps_errors
    async def SkipConditionalParallelGateway(
        self, request: engine_pb2.SkipConditionalParallelGatewayRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        event = SkipConditionalParallelGateway(_required(request.node_id, "node_id"), tuple(request.flow_ids))
        return await self._control(request.pipeline_id, event)

    @maps_errors
    async def ForceFailNode(
        self, request: engine_pb2.ForceFailNodeRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        self.limits.payload(request.message, "message")
        event = ForceFail(_required(request.node_id, "node_id"), request.message)
        return await self._control(request.pipeline_id, event)

    @maps_errors
    async def Callback(
        self, request: engine_pb2.CallbackRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.OperationResponse:
        data = self.limits.json_value(request.data_json, "data_json") if request.data_json else None
        event = Callback(_required(request.node_id, "node_id"), _required(request.version, "version"), data)
        return await self._control(request.pipeline_id, event)

    async def Watch(
        self, request: engine_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.StateChange]:
        if not request.pipeline_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "pipeline_id is required")
        try:
            async for change in self.engine.watch(request.pipeline_id, pipeline_only=request.pipeline_only):
                yield engine_pb2.StateChange(
                    pipeline_id=request.pipeline_id,
                    node_id=change.node_id,
                    old_state=change.old_state,
                    new_state=change.new_state,
                    version=change.version,
                    at_unix_ms=change.at,
                )
        except EngineError as exc:
            await context.abort(STATUS_CODES.get(type(exc), grpc.StatusCode.INTERNAL), str(exc))


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.limits = Limits(settings)
        # Several claimed tasks may go out in one message; this keeps it under the server's send limit.
        self.max_message_bytes = max_message_bytes(settings) - 64 * 1024

    @maps_errors
    async def PollTasks(
        self, request: worker_pb2.PollTasksRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PollTasksResponse:
        codes = [code for code in request.component_codes if code]
        if not codes:
            raise InvalidArgument("component_codes is required: name the component codes this worker serves")
        tasks = await self.engine.poll_tasks(request.worker_id, codes, request.max_tasks, request.wait_ms)
        fitting = self._tasks_that_fit(tasks, used=0)
        self.engine.release(tasks[len(fitting) :])  # too big for one answer: offered again at once
        return worker_pb2.PollTasksResponse(tasks=fitting)

    @maps_errors
    async def Heartbeat(
        self, request: worker_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.HeartbeatResponse:
        return _heartbeat_response(await self._enqueue_heartbeat(request))

    @maps_errors
    async def CompleteTask(
        self, request: worker_pb2.CompleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.CompleteTaskResponse:
        return _complete_response(await self._enqueue_complete(request))

    @maps_errors
    async def FailTask(
        self, request: worker_pb2.FailTaskRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.FailTaskResponse:
        return _fail_response(await self._enqueue_fail(request))

    async def TaskStream(
        self, requests: AsyncIterator[worker_pb2.TaskStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TaskStreamResponse]:
        """Tasks out and reports in on one stream. Each report is checked and applied as its unary call would be;
        whatever is ready when the stream can write goes out in one message."""
        try:
            first = await anext(aiter(requests))
        except StopAsyncIteration:
            return
        codes = [code for code in first.hello.component_codes if code]
        if not codes:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first TaskStream message must carry a hello naming the component codes this worker serves",
            )
        try:
            feed = self.engine.open_task_feed(first.hello.worker_id, codes)
        except EngineError as exc:
            await context.abort(STATUS_CODES.get(type(exc), grpc.StatusCode.INTERNAL), str(exc))
        outbox = _Outbox()
        self._take(first, feed, outbox)

        async def read() -> None:
            try:
                async for request in requests:
                    self._take(request, feed, outbox)
            except Exception as exc:  # the stream broke under us
                outbox.fail(exc)
                return
            outbox.worker_done = True
            outbox.wake()

        async def pump() -> None:
            try:
                while True:
                    claimed = await feed.next_tasks()  # (not `outbox.tasks.extend(await ...)`: the list is swapped)
                    outbox.tasks.extend(claimed)
                    outbox.wake()
            except Exception as exc:
                outbox.fail(exc)

        reader = asyncio.create_task(read())
        pumper = asyncio.create_task(pump())
        try:
            while True:
                await outbox.ready.wait()
                outbox.ready.clear()
                if outbox.error is not None:
                    # Replies already committed still go out before the stream ends.
                    if outbox.replies:
                        replies, outbox.replies = outbox.replies, []
                        yield worker_pb2.TaskStreamResponse(replies=replies)
                    if isinstance(outbox.error, EngineError):
                        code = STATUS_CODES.get(type(outbox.error), grpc.StatusCode.INTERNAL)
                        await context.abort(code, str(outbox.error))
                    raise outbox.error
                if outbox.worker_done:
                    # The worker closed its side: no new tasks, answer what it already sent, then end.
                    pumper.cancel()
                    self.engine.release(outbox.tasks)
                    outbox.tasks = []
                if outbox.tasks or outbox.replies:
                    yield self._next_message(outbox)
                if outbox.tasks or outbox.replies:
                    outbox.wake()  # more than one message's worth was waiting
                elif outbox.worker_done and outbox.unanswered == 0:
                    return
        finally:
            reader.cancel()
            pumper.cancel()
            # Tasks claimed for this stream but never written go back at once instead of waiting for their lease.
            if outbox.tasks:
                self.engine.release(outbox.tasks)

    def _next_message(self, outbox: _Outbox) -> worker_pb2.TaskStreamResponse:
        """What is waiting, up to a size the connection can carry; the rest stays for the next message."""
        message = worker_pb2.TaskStreamResponse(replies=outbox.replies)
        outbox.replies = []
        message.tasks.extend(self._tasks_that_fit(outbox.tasks, used=message.ByteSize()))
        del outbox.tasks[: len(message.tasks)]
        return message

    def _tasks_that_fit(self, tasks: Sequence[ClaimedTask], *, used: int) -> list[worker_pb2.Task]:
        """The first tasks (always at least one) whose messages fit beside `used` bytes in one gRPC message."""
        fitting: list[worker_pb2.Task] = []
        size = used
        for task in tasks:
            converted = converters.task_message(task)
            size += converted.ByteSize() + 8  # field tag and length
            if fitting and size > self.max_message_bytes:
                break
            fitting.append(converted)
        return fitting

    def _take(self, request: worker_pb2.TaskStreamRequest, feed: TaskFeed, outbox: _Outbox) -> None:
        if request.credit > 0:
            feed.add_credit(request.credit)
        for report in request.reports:
            reply = worker_pb2.StreamReply(request_id=report.request_id)
            kind = report.WhichOneof("report")
            try:
                if kind == "complete":
                    future: asyncio.Future[Any] = self._enqueue_complete(report.complete)
                elif kind == "fail":
                    future = self._enqueue_fail(report.fail)
                elif kind == "heartbeat":
                    future = self._enqueue_heartbeat(report.heartbeat)
                else:
                    raise InvalidArgument("a TaskStream report must be one of complete, fail or heartbeat")
            except EngineError as exc:
                outbox.answer(_stream_error(reply, exc))
                continue
            outbox.unanswered += 1
            future.add_done_callback(functools.partial(_answer_report, outbox, reply, kind))

    def _enqueue_heartbeat(self, request: worker_pb2.HeartbeatRequest) -> asyncio.Future[HeartbeatResult]:
        self.limits.payload(request.progress_json, "progress_json")
        if request.progress_json:
            self.limits.json_value(request.progress_json, "progress_json")
        return self.engine.enqueue_heartbeat(_required(request.token, "token"), request.progress_json)

    def _enqueue_complete(self, request: worker_pb2.CompleteTaskRequest) -> asyncio.Future[ReportResult]:
        outputs = self.limits.json_object(request.outputs_json, "outputs_json")
        if request.poll_after_ms < 0:
            raise InvalidArgument("poll_after_ms must not be negative")
        if request.poll_after_ms and request.await_callback:
            raise InvalidArgument("poll_after_ms and await_callback exclude each other")
        return self.engine.enqueue_complete(
            _required(request.token, "token"),
            outputs,
            poll_after_ms=request.poll_after_ms,
            await_callback=request.await_callback,
        )

    def _enqueue_fail(self, request: worker_pb2.FailTaskRequest) -> asyncio.Future[ReportResult]:
        self.limits.payload(request.error_message, "error_message")
        outputs = self.limits.json_object(request.outputs_json, "outputs_json")
        return self.engine.enqueue_fail(
            _required(request.token, "token"),
            request.error_message,
            outputs,
            retryable=request.retryable,
            retry_after_ms=max(0, request.retry_after_ms),
        )


class _Outbox:
    """What one TaskStream has to write next; the writer sends everything ready in one message."""

    def __init__(self) -> None:
        self.tasks: list[ClaimedTask] = []
        self.replies: list[worker_pb2.StreamReply] = []
        self.unanswered = 0
        self.worker_done = False
        self.error: BaseException | None = None
        self.ready = asyncio.Event()

    def wake(self) -> None:
        self.ready.set()

    def answer(self, reply: worker_pb2.StreamReply) -> None:
        self.replies.append(reply)
        self.ready.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.ready.set()


def _answer_report(outbox: _Outbox, reply: worker_pb2.StreamReply, kind: str, future: asyncio.Future[Any]) -> None:
    outbox.unanswered -= 1
    if future.cancelled():
        outbox.answer(_stream_error(reply, Unavailable("the engine server is shutting down; send it again")))
        return
    error = future.exception()
    if error is not None:
        outbox.answer(_stream_error(reply, error))
    elif kind == "complete":
        reply.complete.CopyFrom(_complete_response(future.result()))
        outbox.answer(reply)
    elif kind == "fail":
        reply.fail.CopyFrom(_fail_response(future.result()))
        outbox.answer(reply)
    else:
        reply.heartbeat.CopyFrom(_heartbeat_response(future.result()))
        outbox.answer(reply)


def _stream_error(reply: worker_pb2.StreamReply, error: BaseException) -> worker_pb2.StreamReply:
    _set_error(reply.error, error, what="the report")
    return reply


def _set_error(field: Any, error: BaseException, *, what: str) -> None:
    """Fills an item's error (a StreamError, a StartError) with the status its unary call would have ended with;
    an unexpected exception is logged and answered as INTERNAL."""
    if isinstance(error, EngineError):
        field.code = STATUS_CODES.get(type(error), grpc.StatusCode.INTERNAL).value[0]
        field.message = str(error)
    else:
        log.error("%s failed", what, exc_info=error)
        field.code = grpc.StatusCode.INTERNAL.value[0]
        field.message = f"{what} failed inside the engine; see its log"


def _heartbeat_response(result: HeartbeatResult) -> worker_pb2.HeartbeatResponse:
    return worker_pb2.HeartbeatResponse(
        lease_deadline_unix_ms=result.lease_deadline,
        cancel_requested=result.cancel_requested,
        cancel_reason=result.cancel_reason,
    )


def _complete_response(result: ReportResult) -> worker_pb2.CompleteTaskResponse:
    return worker_pb2.CompleteTaskResponse(duplicate=result.duplicate)


def _fail_response(result: ReportResult) -> worker_pb2.FailTaskResponse:
    return worker_pb2.FailTaskResponse(duplicate=result.duplicate, will_retry=result.will_retry)
