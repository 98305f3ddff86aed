"""The engine: a single batching loop that applies events to pipelines and hands tasks to workers.

RPC handlers never touch the database themselves. They queue an operation and await its future. One loop
drains the queue, and one database thread applies everything queued in one transaction: it runs the pure
`decide` for each event, writes all changes with one statement per kind, claims tasks for the polls that
are waiting, and commits. Only then are the RPCs answered (group commit: an RPC is acknowledged only after
its effects are durable, and one fsync serves many of them).

Snapshots of running pipelines are cached between events; every pipeline row carries a `row_version`, and
a batch re-reads (and on PostgreSQL locks) the rows it touches, so a copy another replica changed is
reloaded instead of trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from engine_server.core.decide import (
    CancelTasks,
    Decision,
    Event,
    OfferTask,
    StartPipeline,
    StartTimer,
    StateChange,
    TaskCompleted,
    TaskFailed,
    TaskKind,
    TimerFired,
    decide,
)
from engine_server.core.frozen import fast_init
from engine_server.core.model import FINAL_PIPELINE_STATES, NodeRun, PipelineSpec, PipelineState, Snapshot
from engine_server.errors import (
    REJECTION_ERRORS,
    AlreadyExists,
    EngineError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from engine_server.logs import log_expired_leases, log_state_changes, operation_ids
from engine_server.metrics import EngineMetrics
from engine_server.records import (
    SpecCache,
    dumps,
    history_row,
    node_from_row,
    node_row,
    reach_order,
    runtime_json,
    snapshot_from_rows,
)
from engine_server.settings import BATCH_MINIMUMS, Settings
from storage.notifier import LocalNotifier, Notifier
from storage.schema import CANCELLED, COMPLETED, DONE, EXECUTE, FAILED, QUEUED, SCHEDULE
from storage.store import Store, WriteSet

log = logging.getLogger("engine_server.engine")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ordered_id() -> str:
    """32 hex digits like a UUID, but starting with the time: new rows land at the end of the primary key's
    b-tree instead of on a random page, so a commit writes fewer pages (SQLite and PostgreSQL alike).

    The random part only has to be unique, not secret (tokens carry their own secret), so it comes from
    `random`, not from a system call per id."""
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(80):020x}"


# ---------------------------------------------------------------- values handed to the RPC layer


@fast_init
@dataclass(frozen=True, slots=True)
class ClaimedTask:
    task_id: str
    token: str
    pipeline_id: str
    node_id: str
    node_version: str
    component_code: str
    component_version: str
    kind: int
    inputs_json: str
    outputs_json: str
    callback_data_json: str
    attempt: int
    loop: int
    inner_loop: int
    retry: int
    schedule_times: int
    lease_deadline: int


@fast_init
@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    lease_deadline: int
    cancel_requested: bool
    cancel_reason: str = ""


@fast_init
@dataclass(frozen=True, slots=True)
class ReportResult:
    duplicate: bool
    will_retry: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class PipelineView:
    """A consistent read of one pipeline for queries."""

    pipeline_id: str
    name: str
    state: PipelineState
    created_at: int
    finished_at: int
    spec: PipelineSpec
    nodes: Sequence[NodeRun]
    outputs: Mapping[str, Any]
    # {"code", "state", "outputs"} of the failure handler, or None.
    failure_handler: Mapping[str, Any] | None


@fast_init
@dataclass(frozen=True, slots=True)
class TaskToken:
    task_id: str
    claim_no: int
    secret: str

    def __str__(self) -> str:
        return f"{self.task_id}.{self.claim_no}.{self.secret}"

    @classmethod
    def parse(cls, text: str) -> TaskToken:
        parts = text.split(".")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[0] or not parts[2]:
            raise InvalidArgument("the task token is malformed: pass the token exactly as PollTasks returned it")
        return cls(parts[0], int(parts[1]), parts[2])


class TaskFeed:
    """The engine side of one TaskStream: tasks are claimed for it while it has credit, without time-outs.

    Credit is what the worker granted minus what it was sent. While the feed waits, a poll with that limit is
    registered like a long poll, so claims, wake-ups and re-checks work exactly as for PollTasks.
    """

    def __init__(self, engine: Engine, worker_id: str, codes: frozenset[str]) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._codes = codes
        self._credit = 0
        self._has_credit = asyncio.Event()
        self._poll: _Poll | None = None
        # The last claim took fewer tasks than it could: none were left then, and any enqueued since are in
        # the engine's "maybe" codes, so the next poll need not try the database before something changes.
        self._drained = False

    def add_credit(self, count: int) -> None:
        self._credit += count
        if self._credit > 0:
            self._has_credit.set()
        if self._poll is not None:
            self._engine._grow_poll(self._poll, self._credit)

    def wake(self) -> None:
        """The engine is stopping: a feed waiting for credit ends now (it raises Unavailable)."""
        self._has_credit.set()

    async def next_tasks(self) -> list[ClaimedTask]:
        """Waits for credit, then for tasks; the credit is spent on what is returned."""
        while True:
            await self._has_credit.wait()
            if self._engine._stopping:
                raise Unavailable("the engine server is shutting down; connect to another")
            self._poll = poll = self._engine._new_poll(
                self._worker_id, self._codes, self._credit, fresh=not self._drained
            )
            try:
                tasks = await self._engine._await_poll(poll, None)
            finally:
                self._poll = None
            self._drained = poll.drained
            if tasks:
                self._credit -= len(tasks)
                if self._credit <= 0:
                    self._has_credit.clear()
                return tasks
            if self._engine._stopping:
                raise Unavailable("the engine server is shutting down; connect to another")


# ---------------------------------------------------------------- queued operations


@dataclass(eq=False)
class _Op:
    future: asyncio.Future[Any] = field(init=False, repr=False)


@dataclass(eq=False)
class _Start(_Op):
    pipeline_id: str
    # The caller named the pipeline: that id may be taken. One the engine made (ordered_id) is new.
    id_chosen: bool
    name: str
    tree_json: str
    spec: PipelineSpec
    presets: Mapping[str, Any]
    idempotency_key: str
    start_node_id: str
    cycle_tolerate: bool
    timeout_ms: int
    failure_handler: str


@dataclass(eq=False)
class _Report(_Op):
    """A worker's CompleteTask or FailTask; `event` builds the core event for the task's node attempt."""

    token: TaskToken
    event: Callable[[str, str], Event]
    is_failure: bool


@dataclass(eq=False)
class _Control(_Op):
    """An operator's operation on a pipeline (pause, retry, skip, callback, ...)."""

    pipeline_id: str
    event: Event


@dataclass(eq=False)
class _Heartbeat(_Op):
    token: TaskToken
    progress_json: str


@dataclass(eq=False)
class _Poll:
    codes: frozenset[str]
    max_tasks: int
    worker_id: str
    future: asyncio.Future[list[ClaimedTask]]
    # Not yet tried against the database.
    fresh: bool = True
    # wait_ms == 0: answer after the first try, empty or not.
    once: bool = False
    # The claim that answered it took fewer tasks than its limit then: none of its codes were left.
    drained: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class _ClaimRequest:
    codes: tuple[str, ...]
    limit: int
    worker_id: str


@fast_init
@dataclass(frozen=True, slots=True)
class _Cycle:
    """What one batch does besides the queued operations."""

    now: int
    reap: bool
    fire_timers: bool


@dataclass
class _BatchResult:
    outcomes: list[Any]
    claims: list[list[ClaimedTask]]
    enqueued_codes: set[str]
    requeued_codes: set[str]
    next_due_at: int | None
    # Earliest pending timer, when this batch fired or added timers (None: unknown / unchanged).
    next_timer_at: int | None
    timers_checked: bool
    # (pipeline id, its state changes, whether the pipeline reached a final state) for watchers.
    changes: list[tuple[str, tuple[StateChange, ...], bool]]


@dataclass
class _Cached:
    snapshot: Snapshot
    row_version: int
    # The snapshot's runtime data as stored; re-encoded only when a decision changed it.
    runtime_json: str


# ---------------------------------------------------------------- the engine


class Engine:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        notifier: Notifier | None = None,
        clock: Callable[[], int] = now_ms,
        metrics: EngineMetrics | None = None,
    ) -> None:
        for name, least in BATCH_MINIMUMS.items():
            if getattr(settings, name) < least:
                # Below that, a batch has no room for one kind of operation and the loop would never drain it.
                raise ValueError(f"{name} must be at least {least}")
        self.store = store
        self.settings = settings
        self.notifier: Notifier = notifier or LocalNotifier()
        self.clock = clock
        self.specs = SpecCache()
        self._db = ThreadPoolExecutor(1, thread_name_prefix="engine-db")
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="engine-read")
        # Touched only by the database thread.
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._writer_conn: Connection | None = None
        # Touched only by the event loop. Events of existing pipelines (reports, heartbeats, operations) queue apart
        # from new pipelines' starts, so that a batch takes them first (see _take_batch).
        self._events: list[_Op] = []
        self._starts: list[_Op] = []
        self._polls: dict[int, _Poll] = {}
        self._releases: list[ClaimedTask] = []
        self._maybe_codes: set[str] = set()
        self._notified_during_batch: set[str] | None = None
        self._next_due_at: int | None = None
        self._next_timer_at: int | None = None
        # pipeline id -> the queues of its Watch streams, each with whether it wants node changes too.
        self._watchers: dict[str, dict[asyncio.Queue[tuple[tuple[StateChange, ...], bool]], bool]] = {}
        self._next_reap_at = 0
        self._next_recheck_at = 0
        self._kick = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        # Open TaskStreams, woken at shutdown (a feed without credit would otherwise wait for gRPC's grace).
        self._feeds: weakref.WeakSet[TaskFeed] = weakref.WeakSet()
        self._batches_since_checkpoint = 0
        self._stopping = False
        self.metrics = metrics or EngineMetrics()
        self.metrics.count_polls_with(lambda: len(self._polls))

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        log.info("database: %s", await loop.run_in_executor(self._db, self.store.prepare_schema))
        self._next_due_at, self._next_timer_at = await loop.run_in_executor(self._readers, self._earliest_pending)
        await self.notifier.start(self._woken)
        self._loop_task = asyncio.create_task(self._run(), name="engine-loop")
        if self.store.is_sqlite:
            self._checkpoint_task = asyncio.create_task(self._checkpoint_now_and_then(), name="engine-checkpoint")

    async def _checkpoint_now_and_then(self) -> None:
        """SQLite's WAL is copied into the database file here, once a second after writes, off the commit path; the
        writer's own checkpoint (storage.database.WAL_AUTOCHECKPOINT_PAGES) finishes it under continuous writes."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await asyncio.sleep(1.0)
            if self._batches_since_checkpoint:
                self._batches_since_checkpoint = 0
                try:
                    await loop.run_in_executor(self._readers, self.store.checkpoint)
                except Exception as exc:  # the next round tries again; commits do not depend on it
                    log.warning("WAL checkpoint failed: %s", exc)

    def _earliest_pending(self) -> tuple[int | None, int | None]:
        """When the first delayed task becomes available and the first timer fires (restart recovery)."""
        with self.store.reader.connect() as conn:
            return self.store.earliest_pending_task(conn), self.store.next_timer_at(conn)

    async def stop(self) -> None:
        """Takes no new operations (UNAVAILABLE), applies those already queued, then closes the database."""
        self._stopping = True
        self._kick.set()
        for feed in list(self._feeds):
            feed.wake()
        if self._loop_task is not None:
            await self._loop_task
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoint_task
        for op in self._events + self._starts:
            if not op.future.done():
                op.future.set_exception(Unavailable("the engine server is shutting down; retry on another"))
        self._events.clear()
        self._starts.clear()
        for poll in self._polls.values():
            if not poll.future.done():
                poll.future.set_result([])
        await asyncio.get_running_loop().run_in_executor(self._db, self._close_writer_connection)
        await self.notifier.stop()
        self._db.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.store.dispose()

    @property
    def stopping(self) -> bool:
        """The engine is shutting down and takes no new operations."""
        return self._stopping

    def _woken(self, codes: set[str]) -> None:
        """A wake-up from another replica; no codes means "you may have missed some: check everything"."""
        if codes:
            self.notify(codes)
        else:
            self._next_recheck_at = 0
            self._kick.set()

    def notify(self, codes: Iterable[str]) -> None:
        """Another replica enqueued tasks of these codes (wake-up only; the database holds the tasks)."""
        codes = set(codes)
        self._maybe_codes |= codes
        if self._notified_during_batch is not None:
            self._notified_during_batch |= codes
        self._kick.set()

    # ------------------------------------------------------------ operations (called by the RPC layer)

    def enqueue_start(
        self,
        *,
        tree_json: str,
        spec: PipelineSpec,
        presets: Mapping[str, Any],
        pipeline_id: str = "",
        name: str = "",
        idempotency_key: str = "",
        start_node_id: str = "",
        cycle_tolerate: bool = False,
        timeout_ms: int = 0,
        failure_handler: str = "",
    ) -> asyncio.Future[tuple[str, bool]]:
        """Queues a start; the future resolves to (pipeline id, created) once it is committed (or refused)."""
        op = _Start(
            pipeline_id=pipeline_id or ordered_id(),
            id_chosen=bool(pipeline_id),
            name=name,
            tree_json=tree_json,
            spec=spec,
            presets=presets,
            idempotency_key=idempotency_key,
            start_node_id=start_node_id,
            cycle_tolerate=cycle_tolerate,
            timeout_ms=timeout_ms,
            failure_handler=failure_handler,
        )
        self.specs.put(tree_json, spec, cycle_tolerate=cycle_tolerate)
        return self._enqueue(op)

    async def complete_task(
        self, token: str, outputs: Mapping[str, Any], *, poll_after_ms: int = 0, await_callback: bool = False
    ) -> ReportResult:
        result: ReportResult = await self.enqueue_complete(
            token, outputs, poll_after_ms=poll_after_ms, await_callback=await_callback
        )
        return result

    def enqueue_complete(
        self, token: str, outputs: Mapping[str, Any], *, poll_after_ms: int = 0, await_callback: bool = False
    ) -> asyncio.Future[ReportResult]:
        """Queues a completion; the future resolves once it is committed (or refused)."""

        def event(node_id: str, version: str) -> Event:
            return TaskCompleted(node_id, version, outputs, poll_after_ms, await_callback)

        return self._enqueue(_Report(TaskToken.parse(token), event, is_failure=False))

    async def fail_task(
        self,
        token: str,
        message: str,
        outputs: Mapping[str, Any],
        *,
        retryable: bool = False,
        retry_after_ms: int = 0,
    ) -> ReportResult:
        result: ReportResult = await self.enqueue_fail(
            token, message, outputs, retryable=retryable, retry_after_ms=retry_after_ms
        )
        return result

    def enqueue_fail(
        self,
        token: str,
        message: str,
        outputs: Mapping[str, Any],
        *,
        retryable: bool = False,
        retry_after_ms: int = 0,
    ) -> asyncio.Future[ReportResult]:
        budget = self.settings.transient_retry_budget

        def event(node_id: str, version: str) -> Event:
            return TaskFailed(node_id, version, message, outputs, retryable, retry_after_ms, budget)

        return self._enqueue(_Report(TaskToken.parse(token), event, is_failure=True))

    async def control(self, pipeline_id: str, event: Event) -> bool:
        """Applies an operator's operation; True if it changed something, False if its effect already held."""
        changed: bool = await self._submit(_Control(pipeline_id=pipeline_id, event=event))
        return changed

    async def watch(self, pipeline_id: str, *, pipeline_only: bool = False) -> AsyncIterator[StateChange]:
        """The pipeline's current state as changes from nothing, then every change until it ends.

        Changes this replica applies arrive at once; the stream also re-reads the pipeline now and then, so
        changes made through other replicas are seen too. `pipeline_only` leaves out the nodes: a cheap way to
        wait for a large pipeline to end.
        """
        queue: asyncio.Queue[tuple[tuple[StateChange, ...], bool]] = asyncio.Queue()
        self._watchers.setdefault(pipeline_id, {})[queue] = not pipeline_only
        known: dict[str, tuple[str, str]] = {}  # node id ("" for the pipeline) -> (state, version)

        def seen(changes: Iterable[StateChange]) -> list[StateChange]:
            fresh = []
            for change in changes:
                if pipeline_only and change.node_id:
                    continue
                if known.get(change.node_id) == (change.new_state, change.version):
                    continue
                fresh.append(change)
                if change.new_state:
                    known[change.node_id] = (change.new_state, change.version)
                else:
                    known.pop(change.node_id, None)
            return fresh

        async def reread() -> tuple[list[StateChange], bool]:
            if pipeline_only:
                state = await self.get_pipeline_state(pipeline_id)
                change = StateChange("", known.get("", ("", ""))[0], state.value, "", self.clock())
                return seen([change]), state in FINAL_PIPELINE_STATES
            view = await self.get_pipeline(pipeline_id)
            now = self.clock()
            current = [
                StateChange(run.node_id, known.get(run.node_id, ("", ""))[0], run.state.value, run.version, now)
                for run in sorted(view.nodes, key=reach_order)
            ]
            present = {run.node_id for run in view.nodes} | {""}
            current += [
                StateChange(node_id, state, "", version, now)
                for node_id, (state, version) in known.items()
                if node_id not in present
            ]
            # The pipeline's own state comes last, so a stream's last message is the pipeline ending.
            current.append(StateChange("", known.get("", ("", ""))[0], view.state.value, "", now))
            return seen(current), view.state in FINAL_PIPELINE_STATES

        try:
            changes, final = await reread()
            for change in changes:
                yield change
            while not final:
                try:
                    batch, final = await asyncio.wait_for(
                        queue.get(), timeout=2 * self.settings.recheck_interval_ms / 1000
                    )
                    changes = seen(batch)
                except TimeoutError:
                    changes, final = await reread()
                for change in changes:
                    yield change
        finally:
            watchers = self._watchers.get(pipeline_id)
            if watchers is not None:
                watchers.pop(queue, None)
                if not watchers:
                    del self._watchers[pipeline_id]

    async def heartbeat(self, token: str, progress_json: str = "") -> HeartbeatResult:
        result: HeartbeatResult = await self.enqueue_heartbeat(token, progress_json)
        return result

    def enqueue_heartbeat(self, token: str, progress_json: str = "") -> asyncio.Future[HeartbeatResult]:
        return self._enqueue(_Heartbeat(TaskToken.parse(token), progress_json))

    async def poll_tasks(self, worker_id: str, codes: Sequence[str], max_tasks: int, wait_ms: int) -> list[ClaimedTask]:
        if self._stopping:
            raise Unavailable("the engine server is shutting down; poll another")
        wait_ms = min(max(wait_ms, 0), self.settings.max_poll_wait_ms)
        poll = self._new_poll(worker_id, codes, max_tasks, once=wait_ms == 0)
        return await self._await_poll(poll, None if poll.once else wait_ms / 1000)

    def open_task_feed(self, worker_id: str, codes: Sequence[str]) -> TaskFeed:
        """Tasks for one TaskStream: a long poll that never times out and takes as many tasks as it has credit."""
        if self._stopping:
            raise Unavailable("the engine server is shutting down; connect to another")
        feed = TaskFeed(self, worker_id, frozenset(codes))
        self._feeds.add(feed)
        return feed

    def _new_poll(
        self, worker_id: str, codes: Iterable[str], max_tasks: int, *, once: bool = False, fresh: bool = True
    ) -> _Poll:
        poll = _Poll(
            codes=frozenset(codes),
            max_tasks=min(max(max_tasks, 1), self.settings.max_tasks_per_poll),
            worker_id=worker_id,
            future=asyncio.get_running_loop().create_future(),
            fresh=fresh,
            once=once,
        )
        self._polls[id(poll)] = poll
        if fresh or not poll.codes.isdisjoint(self._maybe_codes):
            self._kick.set()
        return poll

    async def _await_poll(self, poll: _Poll, timeout: float | None) -> list[ClaimedTask]:
        try:
            return await asyncio.wait_for(asyncio.shield(poll.future), timeout)
        except TimeoutError:
            return poll.future.result() if poll.future.done() and not poll.future.cancelled() else []
        except asyncio.CancelledError:
            # The client went away after tasks were claimed for it: give them back at once.
            if poll.future.done() and not poll.future.cancelled():
                self._releases.extend(poll.future.result())
                self._kick.set()
            raise
        finally:
            self._polls.pop(id(poll), None)
            if not poll.future.done():
                poll.future.cancel()

    def release(self, tasks: Iterable[ClaimedTask]) -> None:
        """Claimed tasks that never reached their worker: offer them again now, not after their lease."""
        before = len(self._releases)
        self._releases.extend(tasks)
        if len(self._releases) > before:
            self._kick.set()

    def _grow_poll(self, poll: _Poll, max_tasks: int) -> None:
        """A waiting poll may take more tasks (a stream got credit): re-try it against the database."""
        if not poll.future.done():
            poll.max_tasks = min(max(max_tasks, 1), self.settings.max_tasks_per_poll)
            poll.fresh = True
            self._kick.set()

    async def _submit(self, op: _Op) -> Any:
        return await self._enqueue(op)

    def _enqueue(self, op: _Op) -> asyncio.Future[Any]:
        if self._stopping:
            raise Unavailable("the engine server is shutting down; retry on another")
        op.future = asyncio.get_running_loop().create_future()
        (self._starts if isinstance(op, _Start) else self._events).append(op)
        self._kick.set()
        return op.future

    # ------------------------------------------------------------ reads

    async def read(self, function: Callable[[Connection], Any]) -> Any:
        def run() -> Any:
            with self.store.reader.connect() as conn:
                return function(conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers, run)
        except RuntimeError:
            if self._stopping:  # the reader threads are gone: a Watch or query outlived the engine
                raise Unavailable("the engine server is shutting down; ask another") from None
            raise

    async def get_pipeline(self, pipeline_id: str) -> PipelineView:
        def load(conn: Connection) -> PipelineView:
            with conn.begin():
                row = self.store.load_pipeline(conn, pipeline_id)
                if row is None:
                    raise NotFound(f"pipeline {pipeline_id!r} does not exist")
                nodes = self.store.load_nodes(conn, pipeline_id)
            spec = self.specs.get(row.tree_json, cycle_tolerate=row.cycle_tolerate)
            runtime = json.loads(row.runtime_json)
            return PipelineView(
                pipeline_id=row.id,
                name=row.name,
                state=PipelineState(row.state),
                created_at=row.created_at,
                finished_at=row.finished_at,
                spec=spec,
                nodes=[node_from_row(n) for n in nodes],
                outputs=runtime.get("outputs", {}),
                failure_handler=runtime.get("failure_handler"),
            )

        view: PipelineView = await self.read(load)
        return view

    async def get_pipeline_state(self, pipeline_id: str) -> PipelineState:
        def load(conn: Connection) -> PipelineState:
            row = self.store.load_pipeline(conn, pipeline_id)
            if row is None:
                raise NotFound(f"pipeline {pipeline_id!r} does not exist")
            return PipelineState(row.state)

        state: PipelineState = await self.read(load)
        return state

    async def purge(self, finished_before: int, batch_size: int = 500) -> int:
        """Retention: deletes ended pipelines batch by batch on the database thread, so engine batches run in
        between (ended pipelines are no longer cached)."""
        if finished_before > self.clock():
            raise InvalidArgument("finished_before is in the future: only pipelines that already ended are purged")
        size = max(1, min(batch_size or 500, 10_000))
        loop = asyncio.get_running_loop()
        purged = 0
        while count := await loop.run_in_executor(self._db, self._purge_batch, finished_before, size):
            purged += count
        if purged:
            log.info("purged %d pipelines that ended before %d", purged, finished_before)
        return purged

    def _purge_batch(self, finished_before: int, size: int) -> int:
        if self._writer_conn is None:
            self._writer_conn = self.store.writer.connect()
        return self.store.purge_batch(self._writer_conn, finished_before, size)

    async def get_node(self, pipeline_id: str, node_id: str) -> NodeRun:
        view = await self.get_pipeline(pipeline_id)
        for run in view.nodes:
            if run.node_id == node_id:
                return run
        if node_id not in view.spec.tree.nodes:
            raise NotFound(f"pipeline {pipeline_id!r} has no node {node_id!r}")
        raise NotFound(f"node {node_id!r} of pipeline {pipeline_id!r} has not been reached, so it has no data")

    async def get_histories(self, pipeline_id: str, node_id: str) -> list[NodeRun]:
        view = await self.get_pipeline(pipeline_id)
        if node_id not in view.spec.tree.nodes:
            raise NotFound(f"pipeline {pipeline_id!r} has no node {node_id!r}")

        def load(conn: Connection) -> list[NodeRun]:
            rows = self.store.load_histories(conn, pipeline_id, node_id)
            return [node_from_row(row) for row in rows]

        runs: list[NodeRun] = await self.read(load)
        return runs

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._kick.is_set() and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), self._seconds_until_due())
            self._kick.clear()
            if self._stopping and not self._events and not self._starts and not self._releases:
                return
            now = self.clock()
            ops = self._take_batch()
            releases, self._releases = self._releases, []
            reap = now >= self._next_reap_at
            if reap:
                self._next_reap_at = now + self.settings.reap_interval_ms
            fire_timers = reap or (self._next_timer_at is not None and now >= self._next_timer_at)
            recheck = now >= self._next_recheck_at or (self._next_due_at is not None and now >= self._next_due_at)
            if recheck:
                self._next_recheck_at = now + self.settings.recheck_interval_ms
                self._next_due_at = None
            polls = [
                p
                for p in self._polls.values()
                if not p.future.done() and (recheck or p.fresh or not p.codes.isdisjoint(self._maybe_codes))
            ]
            if not ops and not polls and not reap and not releases and not fire_timers:
                continue
            requests = [_ClaimRequest(tuple(sorted(p.codes)), p.max_tasks, p.worker_id) for p in polls]
            self._notified_during_batch = set()
            try:
                cycle = _Cycle(now=now, reap=reap, fire_timers=fire_timers)
                result = await loop.run_in_executor(self._db, self._run_batch, ops, requests, releases, cycle)
            except Exception as exc:
                if isinstance(exc, DBAPIError):  # the database stayed unreachable through the retries
                    log.error("batch failed: %s", exc)
                    error: EngineError = Unavailable(f"the engine's database is unavailable: {exc.orig or exc}")
                else:
                    log.exception("batch failed")
                    error = Internal("the engine failed to apply this batch; see the server log")
                for op in ops:
                    if not op.future.done():
                        op.future.set_exception(error)
                self._releases.extend(releases)
                await asyncio.sleep(0.5)
                continue
            finally:
                notified, self._notified_during_batch = self._notified_during_batch or set(), None
            self._deliver(ops, polls, requests, result, notified)

    def _take_batch(self) -> list[_Op]:
        """The next batch's operations: queued events of existing pipelines first, then starts of new ones, at
        most max_starts_per_batch of them.

        Under a burst of starts, FIFO batches of max_batch starts each took 0.4-1.4 s here while the reports of
        running pipelines waited behind them, so workers sat idle and nothing finished until the burst was over.
        Short start batches keep running pipelines moving whatever the queue of new ones. Starts keep up to half
        of a batch even when events fill the queue, so neither kind can hold the other back for good. (A control
        operation sent together with the start of its pipeline, without waiting for the start's answer, may so
        be applied first and find no pipeline: concurrent calls were never ordered.)"""
        limit = self.settings.max_batch
        start_share = min(self.settings.max_starts_per_batch, limit if not self._events else limit // 2)
        starts = self._starts[:start_share]
        del self._starts[: len(starts)]
        events = self._events[: limit - len(starts)]
        del self._events[: len(events)]
        return events + starts

    def _seconds_until_due(self) -> float:
        now = self.clock()
        due = min(self._next_reap_at, self._next_recheck_at if self._polls else self._next_reap_at)
        if self._next_due_at is not None and self._polls:
            due = min(due, self._next_due_at)
        if self._next_timer_at is not None:
            due = min(due, self._next_timer_at)
        return max(0.0, (due - now) / 1000)

    def _deliver(
        self,
        ops: list[_Op],
        polls: list[_Poll],
        requests: list[_ClaimRequest],
        result: _BatchResult,
        notified: set[str],
    ) -> None:
        self._batches_since_checkpoint += 1
        for op, outcome in zip(ops, result.outcomes, strict=True):
            if op.future.done():
                continue
            if isinstance(outcome, BaseException):
                op.future.set_exception(outcome)
            else:
                op.future.set_result(outcome)
        if result.enqueued_codes or result.requeued_codes:
            self.notifier.publish(result.enqueued_codes | result.requeued_codes)
        maybe = self._maybe_codes | result.enqueued_codes | result.requeued_codes
        for poll, request, claimed in zip(polls, requests, result.claims, strict=True):
            if poll.max_tasks == request.limit:
                poll.fresh = False
            # Against the limit this claim used: a stream may have been granted more credit meanwhile.
            poll.drained = len(claimed) < request.limit
            if len(claimed) < request.limit:
                maybe -= poll.codes
            if claimed:
                if poll.future.done():
                    self._releases.extend(claimed)
                else:
                    poll.future.set_result(claimed)
            elif poll.once and not poll.future.done():
                poll.future.set_result([])
        self._maybe_codes = maybe | notified
        if result.next_due_at is not None:
            self._next_due_at = min(result.next_due_at, self._next_due_at or result.next_due_at)
        if result.timers_checked:
            self._next_timer_at = result.next_timer_at
        elif result.next_timer_at is not None:
            self._next_timer_at = min(result.next_timer_at, self._next_timer_at or result.next_timer_at)
        for pipeline_id, changes, final in result.changes:
            watchers = self._watchers.get(pipeline_id)
            if not watchers:
                continue
            own_state_changed = any(not change.node_id for change in changes)
            for queue, wants_nodes in watchers.items():
                if wants_nodes or own_state_changed:
                    queue.put_nowait((changes, final))
        if (
            self._events
            or self._starts
            or self._releases
            or any(
                p.fresh or not p.codes.isdisjoint(self._maybe_codes)
                for p in self._polls.values()
                if not p.future.done()
            )
        ):
            self._kick.set()

    # ------------------------------------------------------------ one batch, in the database thread

    def _run_batch(
        self,
        ops: list[_Op],
        requests: list[_ClaimRequest],
        releases: list[ClaimedTask],
        cycle: _Cycle,
    ) -> _BatchResult:
        for attempt in range(6):
            try:
                if self._writer_conn is None:
                    # One long-lived connection: a pool checkout per batch costs more than the batch's SQL.
                    self._writer_conn = self.store.writer.connect()
                return _Batch(self, cycle).run(self._writer_conn, ops, requests, releases)
            except (OperationalError, DBAPIError) as exc:
                self._cache.clear()
                self._discard_writer_connection()
                if attempt == 5 or not _is_transient(exc):
                    raise
                log.warning("database error, retrying the batch (%s): %s", attempt + 1, exc.orig or exc)
                time.sleep(min(0.05 * 2**attempt, 1.0))
        raise AssertionError("unreachable")

    def _discard_writer_connection(self) -> None:
        if self._writer_conn is not None:
            with contextlib.suppress(Exception):
                self._writer_conn.invalidate()
            self._writer_conn = None

    def _close_writer_connection(self) -> None:
        if self._writer_conn is not None:
            self._writer_conn.close()
            self._writer_conn = None

    def _cache_get(self, pipeline_id: str) -> _Cached | None:
        return self._cache.get(pipeline_id)

    def _cache_put(self, pipeline_id: str, cached: _Cached) -> None:
        if cached.snapshot.state in FINAL_PIPELINE_STATES:
            self._cache.pop(pipeline_id, None)
            return
        self._cache[pipeline_id] = cached
        self._cache.move_to_end(pipeline_id)
        while len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)


def _is_transient(exc: DBAPIError) -> bool:
    if exc.connection_invalidated or isinstance(exc, IntegrityError):
        # IntegrityError: another replica inserted the same pipeline id or idempotency key meanwhile; the
        # retried batch sees it and answers as it should (ALREADY_EXISTS, or the existing pipeline).
        return True
    text = str(exc.orig or exc).lower()
    return any(
        marker in text
        for marker in (
            "database is locked",
            "connection",
            "server closed",
            "terminating",
            "could not serialize",
            "deadlock",
            "timeout",
        )
    )


class _Batch:
    """Applies one batch of operations in one transaction (runs in the database thread)."""

    def __init__(self, engine: Engine, cycle: _Cycle) -> None:
        self.engine = engine
        self.store = engine.store
        self.settings = engine.settings
        self.cycle = cycle
        self.now = cycle.now
        self.changes: list[tuple[str, tuple[StateChange, ...], bool]] = []
        self.next_timer_at: int | None = None
        self.writes = WriteSet()
        self.working: dict[str, _Cached] = {}
        self.dirty: set[str] = set()
        self.nodes: dict[tuple[str, str], dict[str, Any]] = {}
        self.node_deletes: dict[tuple[str, str], dict[str, Any]] = {}
        self.task_inserts: dict[str, dict[str, Any]] = {}
        # Task status as this batch has changed it: task_id -> (status, completed_claim, result_kind)
        self.task_status: dict[str, tuple[int, int, int]] = {}
        self.enqueued_codes: set[str] = set()
        self.next_due_at: int | None = None

    def run(
        self,
        conn: Connection,
        ops: list[_Op],
        requests: list[_ClaimRequest],
        releases: list[ClaimedTask],
    ) -> _BatchResult:
        outcomes: list[Any] = []
        started = time.perf_counter()
        with self.store.transaction(conn):
            task_rows = self.store.load_tasks(
                conn, [op.token.task_id for op in ops if isinstance(op, _Report | _Heartbeat)]
            )
            fired = self.store.fire_due_timers(conn, self.now) if self.cycle.fire_timers else []
            self._load_pipelines(
                conn,
                {row.pipeline_id for row in task_rows.values()}
                | {op.pipeline_id for op in ops if isinstance(op, _Control)}
                | {timer.pipeline_id for timer in fired},
            )
            starts = [op for op in ops if isinstance(op, _Start)]
            taken_ids = self.store.existing_pipeline_ids(conn, [op.pipeline_id for op in starts if op.id_chosen])
            by_key = self.store.pipelines_by_idempotency_key(
                conn, [op.idempotency_key for op in starts if op.idempotency_key]
            )
            for op in ops:
                try:
                    if isinstance(op, _Start):
                        outcomes.append(self._start(op, taken_ids, by_key))
                    elif isinstance(op, _Report):
                        outcomes.append(self._report(op, task_rows.get(op.token.task_id)))
                    elif isinstance(op, _Heartbeat):
                        outcomes.append(self._heartbeat(op, task_rows.get(op.token.task_id)))
                    elif isinstance(op, _Control):
                        outcomes.append(self._control(op.pipeline_id, op.event))
                    else:
                        raise AssertionError(f"unknown operation {op!r}")
                except EngineError as exc:
                    outcomes.append(exc)
                except Exception:
                    # decide() is pure, so a bug in it leaves nothing half-applied: fail this op only.
                    log.exception("operation %r failed", op, extra=operation_ids(op, task_rows))
                    outcomes.append(Internal("the engine failed to apply this operation; see the server log"))
            for timer in fired:
                self._fire(timer)
            self.writes.task_releases = [{"b_id": t.task_id, "b_claim_no": t.attempt} for t in releases]
            self.enqueued_codes.update(t.component_code for t in releases)  # offered again: wake the polls
            self._flush(conn)
            expired = self.store.requeue_expired_leases(conn, self.now) if self.cycle.reap else []
            requeued = {row.component_code for row in expired}
            claims = [self._claim(conn, request) for request in requests]
            timers_checked = self.cycle.fire_timers
            next_timer_at = self.store.next_timer_at(conn) if timers_checked else self.next_timer_at
            writes_done = time.perf_counter()  # keep last in the transaction: the rest is the COMMIT
        self.engine.metrics.batch_committed(
            started, writes_done, len(ops), self.writes, task_rows, claims, expired, self.engine.clock()
        )
        log_state_changes(log, self.changes, lambda pipeline_id: self.working[pipeline_id].snapshot)
        for pipeline_id in self.dirty:
            self.engine._cache_put(pipeline_id, self.working[pipeline_id])
        if expired:
            log_expired_leases(log, expired)
        return _BatchResult(
            outcomes,
            claims,
            self.enqueued_codes,
            requeued,
            self.next_due_at,
            next_timer_at,
            timers_checked,
            self.changes,
        )

    # ------------------------------------------------------------ loading

    def _load_pipelines(self, conn: Connection, pipeline_ids: set[str]) -> None:
        versions = self.store.pipeline_versions(conn, pipeline_ids)
        for pipeline_id, row_version in versions.items():
            cached = self.engine._cache_get(pipeline_id)
            if cached is None or cached.row_version != row_version:
                row = self.store.load_pipeline(conn, pipeline_id)
                if row is None:
                    # Its tree row is gone (the database was changed behind the engine's back). Its operations
                    # fail alone, as for a pipeline that does not exist; the rest of the batch goes on.
                    log.error("pipeline %s has no stored tree; it cannot move", pipeline_id)
                    continue
                spec = self.engine.specs.get(row.tree_json, cycle_tolerate=row.cycle_tolerate)
                nodes = self.store.load_nodes(conn, pipeline_id)
                snapshot = snapshot_from_rows(row, nodes, spec, rerun_limit=self.settings.rerun_limit)
                cached = _Cached(snapshot, row_version, row.runtime_json)
            self.working[pipeline_id] = cached

    # ------------------------------------------------------------ operations

    def _start(self, op: _Start, taken_ids: set[str], by_key: dict[str, str]) -> tuple[str, bool]:
        if op.idempotency_key and op.idempotency_key in by_key:
            return by_key[op.idempotency_key], False
        if op.pipeline_id in taken_ids:
            raise AlreadyExists(f"pipeline id {op.pipeline_id!r} is already taken")
        snapshot = Snapshot(
            pipeline_id=op.pipeline_id,
            spec=op.spec,
            state=PipelineState.RUNNING,
            nodes={},
            contexts={},
            started_at=self.now,
            presets=op.presets,
            rerun_limit=self.settings.rerun_limit,
        )
        decision = decide(snapshot, StartPipeline(op.start_node_id, op.timeout_ms, op.failure_handler), self.now)
        if decision.rejection is not None:
            raise REJECTION_ERRORS[decision.rejection.kind](decision.rejection.message)
        self.writes.new_pipelines.append(
            {
                "id": op.pipeline_id,
                "name": op.name or op.spec.id,
                "cycle_tolerate": op.cycle_tolerate,
                "state": PipelineState.RUNNING.value,
                "row_version": 0,  # the pipeline update below makes it 1
                "version_seq": 0,
                "runtime_json": "{}",  # written by the pipeline update below
                "idempotency_key": op.idempotency_key or None,
                "created_at": self.now,
                "finished_at": 0,
            }
        )
        self.writes.new_trees.append({"pipeline_id": op.pipeline_id, "tree_json": op.tree_json})
        self.working[op.pipeline_id] = _Cached(snapshot, 0, "{}")
        taken_ids.add(op.pipeline_id)
        if op.idempotency_key:
            by_key[op.idempotency_key] = op.pipeline_id
        self._apply(op.pipeline_id, decision)
        return op.pipeline_id, True

    def _control(self, pipeline_id: str, event: Event) -> bool:
        cached = self.working.get(pipeline_id)
        if cached is None:
            raise NotFound(f"pipeline {pipeline_id!r} does not exist")
        decision = decide(cached.snapshot, event, self.now)
        if decision.rejection is not None:
            raise REJECTION_ERRORS[decision.rejection.kind](decision.rejection.message)
        if decision.changed:
            self._apply(pipeline_id, decision)
        return decision.changed

    def _fire(self, timer: Any) -> None:
        """A timer is due: the pipeline decides whether it still matters (the attempt may have moved on)."""
        if timer.pipeline_id not in self.working:
            return  # the pipeline was purged
        try:
            self._control(timer.pipeline_id, TimerFired(timer.kind, timer.node_id, timer.node_version))
        except EngineError as exc:
            ids = {"pipeline_id": timer.pipeline_id, "node_id": timer.node_id}
            log.warning("timer %s of pipeline %s: %s", timer.kind, timer.pipeline_id, exc, extra=ids)

    def _check_token(self, token: TaskToken, row: Any) -> tuple[int, int, int]:
        """Returns the task's (status, completed_claim, result_kind) if the token is the task's current claim."""
        if row is None:
            raise NotFound(f"task {token.task_id!r} does not exist (was its pipeline purged?)")
        status, completed_claim, result_kind = self.task_status.get(
            row.id, (row.status, row.completed_claim, row.result_kind)
        )
        if token.claim_no != row.claim_no or not secrets.compare_digest(token.secret, row.claim_secret):
            raise FailedPrecondition(
                f"stale task token for node {row.node_id!r}: it is for claim {token.claim_no}, but the task has "
                f"since been offered again (claim {row.claim_no}); drop this result"
            )
        if status == QUEUED:
            raise FailedPrecondition(
                f"the lease of task {row.id!r} (node {row.node_id!r}) expired and the task is being offered again; "
                "drop this result"
            )
        return status, completed_claim, result_kind

    def _report(self, op: _Report, row: Any) -> ReportResult:
        status, completed_claim, result_kind = self._check_token(op.token, row)
        kind = FAILED if op.is_failure else COMPLETED
        if status == DONE:
            if completed_claim == op.token.claim_no and result_kind == kind:
                return ReportResult(duplicate=True)
            ended = "failed" if result_kind == FAILED else "completed"
            raise FailedPrecondition(
                f"task {row.id!r} of node {row.node_id!r} has already {ended}; this report is refused"
            )
        if status == CANCELLED:
            raise FailedPrecondition(f"task {row.id!r} was cancelled ({row.cancel_reason}); its result is refused")
        cached = self.working.get(row.pipeline_id)
        if cached is None:
            raise NotFound(f"pipeline {row.pipeline_id!r} of task {row.id!r} does not exist")
        decision = decide(cached.snapshot, op.event(row.node_id, row.node_version), self.now)
        if decision.rejection is not None:
            raise REJECTION_ERRORS[decision.rejection.kind](decision.rejection.message)
        self._apply(row.pipeline_id, decision)
        self.task_status[row.id] = (DONE, op.token.claim_no, kind)
        self.writes.task_completions.append({"b_id": row.id, "completed_claim": op.token.claim_no, "result_kind": kind})
        will_retry = op.is_failure and any(
            isinstance(c, OfferTask) and c.node_id == row.node_id for c in decision.commands
        )
        return ReportResult(duplicate=False, will_retry=will_retry)

    def _heartbeat(self, op: _Heartbeat, row: Any) -> HeartbeatResult:
        status, _, _ = self._check_token(op.token, row)
        if status == CANCELLED:
            return HeartbeatResult(0, True, row.cancel_reason)
        if status == DONE:
            raise FailedPrecondition(f"task {row.id!r} is already completed; stop heartbeating it")
        deadline = self.now + self.settings.lease_ms
        self.writes.lease_extensions.append(
            {
                "b_id": row.id,
                "b_claim_no": op.token.claim_no,
                "lease_deadline": deadline,
                "progress_json": op.progress_json or row.progress_json,
            }
        )
        return HeartbeatResult(deadline, False)

    # ------------------------------------------------------------ applying decisions

    def _apply(self, pipeline_id: str, decision: Decision) -> None:
        cached = self.working[pipeline_id]
        encoded = runtime_json(decision.snapshot) if decision.runtime_changed else cached.runtime_json
        self.working[pipeline_id] = _Cached(decision.snapshot, cached.row_version, encoded)
        self.dirty.add(pipeline_id)
        inputs_json: dict[str, str] = {}
        for command in decision.commands:
            if isinstance(command, OfferTask):
                inputs_json[command.node_id] = self._offer(pipeline_id, command)
            elif isinstance(command, CancelTasks):
                self._cancel(pipeline_id, command)
            elif isinstance(command, StartTimer):
                self._start_timer(pipeline_id, command)
        nodes = decision.snapshot.nodes
        for node_id in decision.changed_node_ids:
            self.node_deletes.pop((pipeline_id, node_id), None)  # deleted, then reached again in this batch
            self.nodes[(pipeline_id, node_id)] = node_row(
                pipeline_id, nodes[node_id], inputs_json=inputs_json.get(node_id)
            )
        for node_id in decision.removed_node_ids:
            self.nodes.pop((pipeline_id, node_id), None)
            self.node_deletes[(pipeline_id, node_id)] = {"b_pipeline_id": pipeline_id, "b_node_id": node_id}
        self.writes.history_inserts.extend(history_row(pipeline_id, run) for run in decision.histories)
        if decision.changes:
            final = decision.snapshot.state in FINAL_PIPELINE_STATES
            self.changes.append((pipeline_id, decision.changes, final))

    def _start_timer(self, pipeline_id: str, command: StartTimer) -> None:
        self.writes.timer_inserts.append(
            {
                "id": ordered_id(),
                "pipeline_id": pipeline_id,
                "node_id": command.node_id,
                "node_version": command.version,
                "kind": command.kind,
                "fire_at": command.fire_at,
                "status": 0,
            }
        )
        self.next_timer_at = min(command.fire_at, self.next_timer_at or command.fire_at)

    def _offer(self, pipeline_id: str, command: OfferTask) -> str:
        task_id = ordered_id()
        inputs_json = dumps(command.inputs)
        self.task_inserts[task_id] = {
            "id": task_id,
            "pipeline_id": pipeline_id,
            "node_id": command.node_id,
            "node_version": command.version,
            "kind": EXECUTE if command.kind == TaskKind.EXECUTE else SCHEDULE,
            "component_code": command.component_code,
            "component_version": command.component_version,
            "status": QUEUED,
            "available_at": command.available_at,
            "lease_deadline": 0,
            "claim_no": 0,
            "claim_secret": "",
            "completed_claim": 0,
            "worker_id": "",
            "cancel_reason": "",
            "inputs_json": inputs_json,
            "outputs_json": dumps(command.outputs),
            "callback_data_json": "" if command.callback_data is None else dumps(command.callback_data),
            "progress_json": "",
            "loop": command.loop,
            "inner_loop": command.inner_loop,
            "retry": command.retry,
            "schedule_times": command.schedule_times,
            "created_at": self.now,
        }
        self.enqueued_codes.add(command.component_code)
        if command.available_at > self.now:
            self.next_due_at = min(command.available_at, self.next_due_at or command.available_at)
        return inputs_json

    def _cancel(self, pipeline_id: str, command: CancelTasks) -> None:
        for task_id, task in list(self.task_inserts.items()):
            if (task["pipeline_id"], task["node_id"], task["node_version"]) == (
                pipeline_id,
                command.node_id,
                command.version,
            ):
                del self.task_inserts[task_id]
        self.writes.task_cancels.append(
            {
                "b_pipeline_id": pipeline_id,
                "b_node_id": command.node_id,
                "b_node_version": command.version,
                "reason": command.reason,
            }
        )

    def _flush(self, conn: Connection) -> None:
        for pipeline_id in self.dirty:
            cached = self.working[pipeline_id]
            snapshot = cached.snapshot
            new_version = cached.row_version + 1
            self.writes.pipeline_updates.append(
                {
                    "b_id": pipeline_id,
                    "state": snapshot.state.value,
                    "row_version": new_version,
                    "version_seq": snapshot.version_seq,
                    "finished_at": snapshot.finished_at,
                    "runtime_json": cached.runtime_json,
                }
            )
            self.working[pipeline_id] = _Cached(snapshot, new_version, cached.runtime_json)
        self.writes.node_upserts = list(self.nodes.values())
        self.writes.node_deletes = list(self.node_deletes.values())
        self.writes.task_inserts = list(self.task_inserts.values())
        self.store.write(conn, self.writes)

    def _claim(self, conn: Connection, request: _ClaimRequest) -> list[ClaimedTask]:
        secret = secrets.token_hex(8)
        deadline = self.now + self.settings.lease_ms
        rows = self.store.claim(
            conn,
            codes=request.codes,
            limit=request.limit,
            now=self.now,
            lease_deadline=deadline,
            worker_id=request.worker_id,
            secret=secret,
        )
        return [
            ClaimedTask(
                task_id=row.id,
                token=str(TaskToken(row.id, row.claim_no, secret)),
                pipeline_id=row.pipeline_id,
                node_id=row.node_id,
                node_version=row.node_version,
                component_code=row.component_code,
                component_version=row.component_version,
                kind=row.kind,
                inputs_json=row.inputs_json,
                outputs_json=row.outputs_json,
                callback_data_json=row.callback_data_json,
                attempt=row.claim_no,
                loop=row.loop,
                inner_loop=row.inner_loop,
                retry=row.retry,
                schedule_times=row.schedule_times,
                lease_deadline=deadline,
            )
            for row in rows
        ]
