"""The worker's threads: a pool whose threads do not keep the process alive, and an event loop thread.

`concurrent.futures.ThreadPoolExecutor` joins its threads at interpreter exit, so one component
stuck in a blocking call would hold a stopped worker process forever. After the shutdown grace
the worker has given up on such tasks (their leases expire and the engine offers them elsewhere),
so the process must be free to exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_WorkItem = tuple[concurrent.futures.Future[Any], Callable[[], Any]]


class DaemonThreadPool(concurrent.futures.Executor):
    """Runs calls on up to `max_workers` daemon threads, started as they are needed."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self._max_workers = max_workers
        self._name_prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._shutdown = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            self._work.put((future, lambda: fn(*args, **kwargs)))
            if self._idle == 0 and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._work_loop, name=f"{self._name_prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            elif self._idle:
                self._idle -= 1  # that idle thread takes this item
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._work.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()

    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, call = item
            if future.set_running_or_notify_cancel():
                try:
                    result = call()
                except BaseException as error:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            with self._lock:
                self._idle += 1


class EventLoopThread:
    """An asyncio loop on its own daemon thread: one runs the task stream, another ``async def`` components."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call_soon(self, callback: Callable[..., None], *args: Any) -> bool:
        """Runs `callback` on the loop (from any thread); False once the loop is stopping or closed."""
        if self._stopping:
            return False
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True

    def is_current(self) -> bool:
        """Whether the caller runs on this loop's thread."""
        return threading.current_thread() is self._thread

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return  # closed meanwhile
        self._thread.join(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # Coroutines still running past the shutdown grace are cancelled, not left pending.
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
