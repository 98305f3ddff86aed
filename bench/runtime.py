"""What every benchmark runner shares: child processes, progress lines, argument checks.

Standard library only: `python -m bench`, `bench.compare` and the peer runners under `.venv-peers` (where the
project's dependencies are not installed) all import it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

STOP_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the benchmark dies, even by SIGKILL, since
    outside the benchmark's process group nothing else would stop it."""
    if sys.platform == "linux":
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildProcess:
    """A command run as a child process in its own process group, with stdout and stderr in `log_path`."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path, *, cwd: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: Ctrl-C reaches only the benchmark, which then stops the children in
                # order, instead of a server vanishing under a running scenario.
                process_group=0,
                preexec_fn=_die_with_parent,
            )

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL to the whole group if it has not exited in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # The group, so that pool children (a prefork Celery worker's) go too.
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
