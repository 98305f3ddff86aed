"""The processes under test: one engine server and N worker processes, each logging to its own file.

`running_engine` starts them and always stops them again, also on Ctrl-C or an error: a benchmark
must never leave a server holding a port or a database open.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.runtime import ChildProcess

ROOT = Path(__file__).resolve().parents[1]
# The SDK logs "worker <id> serving <codes> from <target>" (codes in any order) just before its first
# poll: from then on the worker takes tasks.
_WORKER_READY_LINE = re.compile(r" serving (?=[^\n]*\bnoop\b)(?=[^\n]*\bawait_callback\b)[^\n]* from ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env() -> dict[str, str]:
    # ENGINE_* variables of the caller's shell would silently change the server under test.
    env = {key: value for key, value in os.environ.items() if not key.startswith("ENGINE_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _python_module(name: str, module_args: Sequence[str], log_path: Path) -> ChildProcess:
    """A Python module of this checkout run as a child process, with stdout and stderr in `log_path`."""
    return ChildProcess(name, [sys.executable, "-m", *module_args], log_path, cwd=ROOT, env=_child_env())


def _wait_until_serving(server: ChildProcess, address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.exited():
            raise RuntimeError(f"the engine server exited at start:\n{server.log_tail()}")
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                continue
    raise RuntimeError(f"the engine server did not start within {timeout:g} s:\n{server.log_tail()}")


def _wait_for_log_line(process: ChildProcess, pattern: re.Pattern[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.exited():
            raise RuntimeError(f"{process.name} exited at start:\n{process.log_tail()}")
        if process.log_path.exists() and pattern.search(process.log_path.read_text(errors="replace")):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{process.name} was not ready within {timeout:g} s:\n{process.log_tail()}")


@dataclass(frozen=True)
class EngineSetup:
    database_url: str
    workers: int
    concurrency: int
    sqlite_synchronous: str
    log_dir: Path


@dataclass
class RunningEngine:
    address: str
    server: ChildProcess
    workers: list[ChildProcess]

    @property
    def server_pid(self) -> int:
        """The engine server's own process (started directly, not through a shell)."""
        assert self.server.process is not None, "the server was not started"
        return self.server.process.pid

    @property
    def worker_pids(self) -> tuple[int, ...]:
        return tuple(worker.process.pid for worker in self.workers if worker.process is not None)

    def check_alive(self) -> None:
        """Raises if a process died: a scenario would otherwise just wait for work nobody does."""
        for process in (self.server, *self.workers):
            if process.exited():
                raise RuntimeError(f"{process.name} exited during the benchmark:\n{process.log_tail()}")


@contextmanager
def running_engine(setup: EngineSetup, *, start_timeout: float = 30.0) -> Iterator[RunningEngine]:
    address = f"127.0.0.1:{free_port()}"
    server = _python_module(
        "engine server",
        [
            "engine_server",
            "--listen",
            address,
            "--database-url",
            setup.database_url,
            "--sqlite-synchronous",
            setup.sqlite_synchronous,
        ],
        setup.log_dir / "server.log",
    )
    workers = [
        _python_module(
            f"worker {n}",
            ["bench.worker", "--target", address, "--concurrency", str(setup.concurrency)],
            setup.log_dir / f"worker-{n}.log",
        )
        for n in range(setup.workers)
    ]
    with ExitStack() as stack:
        # Registered before starting, so a failure or Ctrl-C half-way still stops what did start;
        # workers are stopped first (they would only retry against a stopped server).
        stack.callback(server.stop)
        server.start()
        _wait_until_serving(server, address, start_timeout)
        for worker in workers:
            stack.callback(worker.stop)
            worker.start()
        for worker in workers:
            _wait_for_log_line(worker, _WORKER_READY_LINE, start_timeout)
        yield RunningEngine(address, server, workers)
