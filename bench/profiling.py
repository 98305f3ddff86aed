"""Sampling the engine server with py-spy while scenarios run (`python -m bench --profile DIR`).

Three py-spy recorders attach to the server's pid for the measured runs:

* a flame graph (SVG) and a speedscope profile (open it at https://www.speedscope.app) of every
  active thread: the full picture, also threads that wait for the GIL or for an fsync;
* collapsed stacks of only the thread holding the GIL: where the server's Python CPU goes, which on
  a Python server is the resource that runs out first.

From the speedscope and collapsed files a short text summary lists the functions with the most
samples, by own time (the function itself was running) and by total time (it was on the stack), so
a reader sees where the time goes without opening the SVG. py-spy sees Python frames only (gRPC's C
core threads are not in them) and leaves out threads it finds idle. The recorders read the server's
memory without pausing it (`--nonblocking`): several recorders cannot pause one process at once
(ptrace allows one tracer; trying stalled the server), and the server runs at full speed; a stack
read while it changes is dropped by py-spy (its "Errors" count).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_S = 100
TOP_FUNCTIONS = 20
_STOP_TIMEOUT_S = 60.0
# A frame of py-spy's collapsed stacks: "function (file:line)".
_COLLAPSED_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>.*?)(?::\d+)?\)$")


@dataclass(frozen=True)
class Samples:
    """Sample counts of one recording: in all, and per function by own and by total time, largest first."""

    count: int
    own: list[tuple[str, int]]
    total: list[tuple[str, int]]

    def top(self, counts: Sequence[tuple[str, int]], limit: int) -> list[dict[str, Any]]:
        return [{"function": name, "percent": round(100 * n / self.count, 2)} for name, n in counts[:limit]]


@dataclass
class Profile:
    flame_graph: Path
    speedscope: Path
    gil_stacks: Path
    summary: Path
    active: Samples | None = None
    gil: Samples | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "flame_graph": str(self.flame_graph),
            "speedscope": str(self.speedscope),
            "gil_collapsed_stacks": str(self.gil_stacks),
            "summary": str(self.summary),
            "samples_per_s": SAMPLES_PER_S,
        }
        if self.gil is not None:
            document["gil_samples"] = self.gil.count
            document["gil_top_own"] = self.gil.top(self.gil.own, 10)
        if self.active is not None:
            document["active_samples"] = self.active.count
        return document


def _py_spy() -> str:
    # Beside the running interpreter first: the virtualenv's copy, also when it is not activated.
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError('py-spy is not installed: `make install` (the "bench" extra) installs it')
    return found


def _start_recorder(pid: int, arguments: Sequence[str], output: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as log_file:
        return subprocess.Popen(
            [
                *(_py_spy(), "record", "--pid", str(pid), "--rate", str(SAMPLES_PER_S), "--nonblocking"),
                *(*arguments, "--output", str(output)),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def _stop_recorder(recorder: subprocess.Popen[bytes], log: Path) -> None:
    """SIGINT makes py-spy stop sampling and write its output."""
    if recorder.poll() is None:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()
            raise RuntimeError(f"py-spy did not stop within {_STOP_TIMEOUT_S:g} s") from None
    if recorder.returncode not in (0, -signal.SIGINT):
        raise RuntimeError(f"py-spy failed (exit {recorder.returncode}):\n{log.read_text(errors='replace')}")


@contextmanager
def profiling(pid: int, directory: Path, progress: Callable[[str], None]) -> Iterator[Profile]:
    """Records the process `pid` while the block runs; the Profile is complete once the block has ended."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"engine-server-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    profile = Profile(
        flame_graph=directory / f"{stem}.svg",
        speedscope=directory / f"{stem}.speedscope.json",
        gil_stacks=directory / f"{stem}-gil.collapsed.txt",
        summary=directory / f"{stem}-top.txt",
    )
    plan = [
        (["--format", "flamegraph"], profile.flame_graph),
        (["--format", "speedscope"], profile.speedscope),
        (["--format", "raw", "--gil"], profile.gil_stacks),
    ]
    logs = [output.with_name(output.name + ".log") for _, output in plan]
    recorders: list[subprocess.Popen[bytes]] = []
    try:
        for (arguments, output), log in zip(plan, logs, strict=True):
            recorders.append(_start_recorder(pid, arguments, output, log))
        # py-spy exits at once when it cannot attach (no ptrace permission, not a Python process).
        time.sleep(1.0)
        for recorder, log in zip(recorders, logs, strict=False):
            if recorder.poll() is not None:
                raise RuntimeError(f"py-spy could not attach to pid {pid}:\n{log.read_text(errors='replace')}")
        progress(f"py-spy is sampling the engine server (pid {pid}) {SAMPLES_PER_S} times a second")
        yield profile
    finally:
        for recorder, log in zip(recorders, logs, strict=False):
            _stop_recorder(recorder, log)
    for log in logs:
        log.unlink(missing_ok=True)
    profile.active = read_speedscope(profile.speedscope)
    profile.gil = read_collapsed(profile.gil_stacks)
    profile.summary.write_text(summary_text(profile.gil, profile.active))
    progress(
        f"profile of the engine server:\n  flame graph  {profile.flame_graph}\n  speedscope   {profile.speedscope}"
        f"\n  GIL stacks   {profile.gil_stacks}\n  summary      {profile.summary}\n"
        + summary_text(profile.gil, profile.active, limit=10, totals=False)
    )


def _short_file(path: str) -> str:
    """A frame's file as a reader knows it: in an installed package, in the project, or the standard library."""
    if not path.startswith("/"):
        return path  # already short (py-spy's collapsed stacks shorten names themselves)
    _, marker, package_path = path.rpartition("-packages/")
    if marker:
        return package_path
    if path.startswith(f"{ROOT}/"):
        return path[len(str(ROOT)) + 1 :]
    return "/".join(Path(path).parts[-2:])


def _count(stacks: Iterable[tuple[Sequence[str], int]]) -> Samples:
    """Stacks run from the outermost frame to the one running."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    count = 0
    for stack, weight in stacks:
        if not stack:
            continue
        count += weight
        own[stack[-1]] += weight
        for name in set(stack):
            total[name] += weight
    return Samples(count, own.most_common(), total.most_common())


def read_speedscope(path: Path) -> Samples:
    """py-spy's speedscope file: one sampled profile per thread, each sample a list of frame indices.

    A function is named ``name (file)``: the samples of its different lines are added up.
    """
    document = json.loads(path.read_text())
    frames = [f"{frame['name']} ({_short_file(frame.get('file') or '?')})" for frame in document["shared"]["frames"]]
    return _count(([frames[i] for i in stack], 1) for thread in document["profiles"] for stack in thread["samples"])


def read_collapsed(path: Path) -> Samples:
    """py-spy's raw format: one line per distinct stack, ``frame;frame;... count``."""

    def stacks() -> Iterator[tuple[list[str], int]]:
        for line in path.read_text().splitlines():
            text, _, weight = line.rpartition(" ")
            if not text or not weight.isdigit():
                continue
            names = []
            for frame in text.split(";"):
                match = _COLLAPSED_FRAME.match(frame)
                names.append(f"{match['name']} ({_short_file(match['file'])})" if match else frame)
            yield names, int(weight)

    return _count(stacks())


def _section(title: str, samples: Samples, limit: int, totals: bool) -> list[str]:
    lines = [f"{title}: {samples.count} samples ({samples.count / SAMPLES_PER_S:.1f} s)"]
    if not samples.count:
        return [*lines, "  (no samples)", ""]
    views = [("own time (the function itself was running)", samples.own)]
    if totals:
        views.append(("total time (the function was on the stack)", samples.total))
    for view, counts in views:
        lines.append(f"  top {limit} by {view}:")
        lines.extend(f"    {100 * n / samples.count:5.1f}%  {name}" for name, n in counts[:limit])
    return [*lines, ""]


def summary_text(gil: Samples, active: Samples, *, limit: int = TOP_FUNCTIONS, totals: bool = True) -> str:
    return "\n".join(
        [
            *_section("holding the GIL (the server's Python CPU)", gil, limit, totals),
            *_section("all active threads (also waiting for the GIL, a lock or an fsync)", active, limit, totals),
        ]
    )
