"""`sustained`: one-activity pipelines for `--sustained-seconds` (30 s), in two phases.

1. **Saturated** (closed loop): client processes keep `WINDOW` pipelines in flight, starting a new one
   as soon as one of theirs settles, so the engine, not the client, is the limit. Reported: the
   pipelines (= tasks) whose engine finish time falls inside the phase, per second.
2. **Half rate** (open loop): pipelines are started on a fixed schedule at half the saturated rate,
   whether or not earlier ones have finished, for the same duration. Reported: start-to-finish
   latency, from the client issuing the Start call to the engine's finish time (both wall clocks of
   this host), and the offered rate the client really achieved.

The load comes from separate client processes (asyncio, one gRPC channel each), so the client's
Python does not share a GIL with the measuring process; the open loop uses one process per
`OPEN_LOOP_RATE_PER_PROCESS` starts/s of the target unless `--client-processes` says otherwise.
Each process reports the CPU it used: near 100 % of a core would mean the client was the limit.
"""

from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing
import queue
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.aio_client import AsyncEngineClient, PipelineSummary, StartBatcher
from bench.procstat import cpu_seconds, machine_idle_and_total_ticks
from bench.scenarios.base import RunResult, Scenario, ScenarioContext, require_finished
from bench.scenarios.independent import one_noop_tree_json
from bench.stats import percentile

# Pipelines kept in flight by the closed loop (scaled by --scale): well above what the workers hold at
# once (2 x 8), so ready tasks are always waiting for them, even between two looks at what has settled
# (at 2,500 pipelines/s about 60 slots empty between looks). 128 and 512 measured the same rate here.
WINDOW = 256
# How often the closed loop asks which pipelines are still running. Each look is one ListPipelines of
# at most WINDOW rows: rare enough to cost the engine little, often enough to refill the window in time.
SETTLED_POLL_S = 0.05
# Starts per second one client process offers comfortably (asyncio, one channel): above this, the
# open loop is split over several processes.
OPEN_LOOP_RATE_PER_PROCESS = 1000.0
# The open loop sends the starts scheduled within this long of each other in one StartPipelines call;
# each start's latency is counted from its own scheduled time, so the wait is part of it.
OPEN_LOOP_LINGER_S = 0.002
# Below this fraction of the target rate, the report says the client could not offer the load.
OFFERED_RATE_TOLERANCE = 0.95


@dataclass(frozen=True)
class Started:
    """One Start call of a load process (wall-clock seconds)."""

    pipeline_id: str
    scheduled_at: float
    """When the schedule wanted the call made (the open loop); the issue time in the closed loop."""
    issued_at: float
    answered_at: float


@dataclass(frozen=True)
class LoadResult:
    started: list[Started]
    cpu_s: float
    """CPU the load process used from the phase's beginning to its end (not while draining)."""


# --- inside a load process ----------------------------------------------------------------------


async def _sleep_until(wall_time: float) -> None:
    delay = wall_time - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


class _PhaseCpu:
    """The process's CPU time between the phase's beginning and its end, read on the event loop."""

    def __init__(self, end_at: float) -> None:
        self.began = time.process_time()
        self.ended: float | None = None
        asyncio.get_running_loop().call_later(max(0.0, end_at - time.time()), self._end)

    def _end(self) -> None:
        self.ended = time.process_time()

    @property
    def seconds(self) -> float:
        return (self.ended if self.ended is not None else time.process_time()) - self.began


async def _closed_loop(address: str, begin_at: float, seconds: float, window: int) -> LoadResult:
    """`window` starters, each starting a pipeline and waiting for it to settle, until the phase ends."""
    end_at = begin_at + seconds
    started: list[Started] = []
    # Pipeline id -> (when its Start was answered, resolved once it is seen settled).
    waiting: dict[str, tuple[float, asyncio.Future[None]]] = {}
    loop = asyncio.get_running_loop()
    async with AsyncEngineClient(address) as client:
        starts = StartBatcher(client)

        async def resolve_settled() -> None:
            while True:
                asked_at = time.time()
                unsettled = await client.unsettled_ids()
                for pipeline_id, (answered_at, done) in list(waiting.items()):
                    # A Start answered after the question was asked may be missing from the answer.
                    if answered_at < asked_at and pipeline_id not in unsettled:
                        del waiting[pipeline_id]
                        done.set_result(None)
                await asyncio.sleep(SETTLED_POLL_S)

        async def starter(number: int) -> None:
            sequence = 0
            while time.time() < end_at:
                tree_json = one_noop_tree_json(number * 1_000_000 + sequence)
                sequence += 1
                issued_at = time.time()
                pipeline_id = await starts.start(tree_json)
                answered_at = time.time()
                started.append(Started(pipeline_id, issued_at, issued_at, answered_at))
                done: asyncio.Future[None] = loop.create_future()
                waiting[pipeline_id] = (answered_at, done)
                await done

        await _sleep_until(begin_at)
        cpu = _PhaseCpu(end_at)
        watcher = asyncio.create_task(resolve_settled())
        starters: asyncio.Future[list[None]] = asyncio.gather(*(starter(number) for number in range(window)))
        try:
            # The watcher only ends by failing; then the starters would wait forever: stop with its error.
            either: list[asyncio.Future[Any]] = [watcher, starters]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if watcher.done():
                starters.cancel()
                watcher.result()
            await starters
        finally:
            watcher.cancel()
    return LoadResult(started, cpu.seconds)


async def _open_loop(address: str, begin_at: float, seconds: float, rate: float, offset_s: float) -> LoadResult:
    """Starts a pipeline every 1/`rate` s from `begin_at + offset_s`, never waiting for earlier ones."""
    end_at = begin_at + seconds
    calls: set[asyncio.Task[Started]] = set()
    async with AsyncEngineClient(address) as client:
        starts = StartBatcher(client, linger_s=OPEN_LOOP_LINGER_S)

        async def start(scheduled_at: float, tree_json: str) -> Started:
            issued_at = time.time()
            pipeline_id = await starts.start(tree_json)
            return Started(pipeline_id, scheduled_at, issued_at, time.time())

        await _sleep_until(begin_at)
        cpu = _PhaseCpu(end_at)
        sequence = 0
        while (scheduled_at := begin_at + offset_s + sequence / rate) < end_at:
            tree_json = one_noop_tree_json(sequence)  # built before the wait, so not on the schedule's time
            sequence += 1
            await _sleep_until(scheduled_at)
            calls.add(asyncio.create_task(start(scheduled_at, tree_json)))
        return LoadResult(list(await asyncio.gather(*calls)), cpu.seconds)


def _load_process(
    address: str,
    mode: str,
    seconds: float,
    amount: float,
    offset_s: float,
    ready: multiprocessing.Queue[Any],
    go: multiprocessing.Queue[Any],
    results: multiprocessing.Queue[Any],
) -> None:
    """Entry point of a load process: says it is ready, waits for the start time, runs, reports."""
    # The collector's pauses here would count as the engine's latency: full collections of this process took
    # 31-72 ms during the open loop. It lives for one phase, so the collector stays off; the reference cycles it
    # leaves behind meanwhile (gRPC's, a few per call) come to a few MB at most.
    gc.disable()
    ready.put(None)
    begin_at = go.get()
    try:
        if mode == "closed":
            result = asyncio.run(_closed_loop(address, begin_at, seconds, int(amount)))
        else:
            result = asyncio.run(_open_loop(address, begin_at, seconds, amount, offset_s))
    except BaseException:
        results.put(("error", traceback.format_exc()))
        return
    results.put(("ok", result))


# --- in the benchmark -----------------------------------------------------------------------------


class _PhaseWindowCpu:
    """The server's and the workers' CPU between a phase's beginning and its end, read from /proc by a thread
    that sleeps until those instants (the phase runs in other processes, and `_run_load` blocks meanwhile)."""

    def __init__(self, context: ScenarioContext, begin_at: float, seconds: float) -> None:
        self._pids = ([context.server_pid] if context.server_pid else [], list(context.worker_pids))
        self._begin_at, self._seconds = begin_at, seconds
        self.wall_s = seconds
        self.server_cpu_s = self.workers_cpu_s = 0.0
        self.machine_idle_percent = 0.0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._watch, name="bench-phase-cpu", daemon=True)
        self._thread.start()

    def _read(self) -> tuple[float, float, float]:
        server_pids, worker_pids = self._pids
        server = sum(cpu_seconds(pid) for pid in server_pids)
        return time.monotonic(), server, sum(cpu_seconds(pid) for pid in worker_pids)

    def _watch(self) -> None:
        try:
            time.sleep(max(0.0, self._begin_at - time.time()))
            began, server_before, workers_before = self._read()
            idle_before, total_before = machine_idle_and_total_ticks()
            time.sleep(max(0.0, self._begin_at + self._seconds - time.time()))
            ended, server_after, workers_after = self._read()
            idle_after, total_after = machine_idle_and_total_ticks()
        except BaseException as exc:  # a process gone: join() raises it rather than reporting zeros
            self._error = exc
            return
        # The interval really read, not the nominal one: a late wake-up would bias a short phase.
        self.wall_s = ended - began
        self.machine_idle_percent = 100.0 * (idle_after - idle_before) / max(total_after - total_before, 1)
        self.server_cpu_s, self.workers_cpu_s = server_after - server_before, workers_after - workers_before

    def join(self) -> _PhaseWindowCpu:
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("could not read the processes' CPU during the phase") from self._error
        return self


def _run_load(
    context: ScenarioContext, mode: str, amounts: Sequence[float], offsets: Sequence[float]
) -> tuple[float, list[LoadResult], _PhaseWindowCpu]:
    """Runs one phase in len(amounts) load processes started together; returns its begin time, the load
    processes' results and the CPU the server and workers used during the phase."""
    spawn = multiprocessing.get_context("spawn")  # never fork a process that has gRPC threads
    ready: multiprocessing.Queue[Any] = spawn.Queue()
    go: multiprocessing.Queue[Any] = spawn.Queue()
    results: multiprocessing.Queue[Any] = spawn.Queue()
    processes = [
        spawn.Process(
            target=_load_process,
            args=(context.address, mode, context.sustained_seconds, amount, offset, ready, go, results),
            name=f"bench-load-{number}",
            daemon=True,
        )
        for number, (amount, offset) in enumerate(zip(amounts, offsets, strict=True))
    ]
    try:
        for process in processes:
            process.start()
        for _ in processes:
            _get(ready, processes, context, timeout=60.0)
        # A moment ahead, so every process is waiting for the same instant.
        begin_at = time.time() + 0.2
        window = _PhaseWindowCpu(context, begin_at, context.sustained_seconds)
        for _ in processes:
            go.put(begin_at)
        outcomes = [_get(results, processes, context, timeout=context.timeout) for _ in processes]
        for process in processes:
            process.join(timeout=30)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()
    errors = [detail for status, detail in outcomes if status == "error"]
    if errors:
        raise RuntimeError(f"a load process failed:\n{errors[0]}")
    return begin_at, [detail for _, detail in outcomes], window.join()


def _get(source: multiprocessing.Queue[Any], processes: Sequence[Any], context: ScenarioContext, timeout: float) -> Any:
    """The next message from the load processes, failing early if one of them or the engine died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return source.get(timeout=1.0)
        except queue.Empty:
            context.check_alive()
            dead = [p.name for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"load process {dead[0]} died") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"load processes gave no answer within {timeout:g} s") from None


def _settle(context: ScenarioContext, started: Sequence[Started]) -> dict[str, PipelineSummary]:
    """Waits until every started pipeline settled; returns them by id (all FINISHED, or raises)."""
    pipeline_ids = [s.pipeline_id for s in started]

    async def wait() -> dict[str, PipelineSummary]:
        deadline = time.monotonic() + context.timeout
        async with AsyncEngineClient(context.address) as client:
            while set(pipeline_ids) & await client.unsettled_ids():
                context.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pipelines still running {context.timeout:g} s after the phase")
                await asyncio.sleep(0.2)
            return await client.settled(pipeline_ids)

    summaries = asyncio.run(wait())
    require_finished([(summary.id, summary.state) for summary in summaries.values()])
    if len(summaries) != len(pipeline_ids):
        raise RuntimeError(f"started {len(pipeline_ids)} pipelines but found {len(summaries)} of them settled")
    return summaries


def _cpu_percent(loads: Sequence[LoadResult], seconds: float) -> float:
    """The busiest load process's CPU over the phase, in percent of one core."""
    return max(100.0 * load.cpu_s / seconds for load in loads)


def run_sustained(context: ScenarioContext) -> RunResult:
    seconds = context.sustained_seconds

    # Phase 1: closed loop, WINDOW pipelines in flight across the processes.
    in_flight = context.scaled(WINDOW)
    saturating_processes = context.client_processes or 1
    share, extra = divmod(in_flight, saturating_processes)
    windows = [share + (n < extra) for n in range(saturating_processes)]
    saturated_begin, saturated_loads, saturated_cpu = _run_load(
        context, "closed", windows, [0.0] * saturating_processes
    )
    saturated = [s for load in saturated_loads for s in load.started]
    saturated_summaries = _settle(context, saturated)
    phase_ms = (saturated_begin * 1000, (saturated_begin + seconds) * 1000)
    completed_in_phase = sum(1 for s in saturated_summaries.values() if phase_ms[0] <= s.finished_ms <= phase_ms[1])
    saturated_rate = completed_in_phase / seconds
    if completed_in_phase == 0:
        raise RuntimeError(f"no pipeline finished within the {seconds:g} s saturated phase")

    # Phase 2: open loop at half the saturated rate, split over processes, interleaved.
    target_rate = saturated_rate / 2
    open_processes = context.client_processes or max(1, math.ceil(target_rate / OPEN_LOOP_RATE_PER_PROCESS))
    offsets = [n / target_rate for n in range(open_processes)]
    half_begin, half_loads, _ = _run_load(context, "open", [target_rate / open_processes] * open_processes, offsets)
    half = [s for load in half_loads for s in load.started]
    half_summaries = _settle(context, half)
    half_end = half_begin + seconds
    offered_rate = sum(1 for s in half if s.issued_at < half_end) / seconds

    by_id = half_summaries
    start_to_finish = [by_id[s.pipeline_id].finished_ms - s.issued_at * 1000 for s in half]
    engine_start_to_finish = [float(by_id[s.pipeline_id].finished_ms - by_id[s.pipeline_id].created_ms) for s in half]
    start_lag = [(s.issued_at - s.scheduled_at) * 1000 for s in half]
    saturated_latency = [saturated_summaries[s.pipeline_id].finished_ms - s.issued_at * 1000 for s in saturated]
    return RunResult(
        wall_s=seconds,
        tasks=completed_in_phase,
        tasks_run=len(saturated) + len(half),
        latencies_ms={
            "start_to_finish": start_to_finish,
            "engine_start_to_finish": engine_start_to_finish,
            "start_call": [(s.answered_at - s.issued_at) * 1000 for s in half],
            "start_lag": start_lag,
            "saturated_start_to_finish": saturated_latency,
        },
        details={
            "saturated": {
                "seconds": seconds,
                "in_flight": in_flight,
                "client_processes": saturating_processes,
                "started": len(saturated),
                "finished_in_phase": completed_in_phase,
                "client_cpu_percent": round(_cpu_percent(saturated_loads, seconds), 1),
            },
            "half_rate": {
                "seconds": seconds,
                "client_processes": open_processes,
                "target_rate_per_s": round(target_rate, 2),
                "offered_rate_per_s": round(offered_rate, 2),
                "started": len(half),
                "start_lag_p99_ms": round(percentile(start_lag, 0.99), 3),
                "client_cpu_percent": round(_cpu_percent(half_loads, seconds), 1),
                "offered_the_target": offered_rate >= OFFERED_RATE_TOLERANCE * target_rate,
            },
        },
        figures={
            "saturated_tasks_per_s": saturated_rate,
            "half_rate_target_per_s": target_rate,
            "half_rate_offered_per_s": offered_rate,
            "half_rate_p50_ms": percentile(start_to_finish, 0.50),
            "half_rate_p99_ms": percentile(start_to_finish, 0.99),
            # Which was the limit of the saturated rate: the server (one process, whose Python runs on one core
            # at a time) near 100 % with idle cores left, or the machine (no idle left).
            "saturated_server_cpu_percent": 100.0 * saturated_cpu.server_cpu_s / saturated_cpu.wall_s,
            "saturated_workers_cpu_percent": 100.0 * saturated_cpu.workers_cpu_s / saturated_cpu.wall_s,
            "saturated_machine_idle_percent": saturated_cpu.machine_idle_percent,
            "saturated_server_cpu_ms_per_task": 1000.0 * saturated_cpu.server_cpu_s / completed_in_phase,
        },
    )


SUSTAINED = Scenario(
    name="sustained",
    description="one-activity pipelines for --sustained-seconds: the saturated rate (closed loop), then "
    "start-to-finish latency at half that rate (open loop)",
    headline_latency="start_to_finish",
    run=run_sustained,
)
