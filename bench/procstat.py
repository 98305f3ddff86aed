"""Memory and CPU time of a process, read from Linux's /proc (no dependency, no sampling thread)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size: the `VmRSS` line of /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmRSS unit {unit!r} in /proc/{pid}/status")
            return int(value) * 1024
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far (`utime` + `stime` of /proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may contain spaces: count fields after it.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLOCK_TICKS_PER_S


def machine_idle_and_total_ticks() -> tuple[int, int]:
    """All cores' idle (idle + iowait) and total clock ticks so far: the first line of /proc/stat."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # guest and guest_nice (the 9th and 10th) are already counted in user and nice.
    return ticks[3] + ticks[4], sum(ticks[:8])


@dataclass(frozen=True)
class CpuSample:
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int

    @property
    def cpu_percent(self) -> float:
        """CPU used over the interval, in percent of one core."""
        return 100.0 * self.cpu_s / self.wall_s


def watch_process(pid: int, seconds: float, *, interval: float = 0.5) -> CpuSample:
    """Sleeps `seconds` while the process runs, and returns the CPU it used meanwhile and its peak RSS."""
    began_wall, began_cpu = time.monotonic(), cpu_seconds(pid)
    peak_rss = rss_bytes(pid)
    deadline = began_wall + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(interval, left))
        peak_rss = max(peak_rss, rss_bytes(pid))
    return CpuSample(time.monotonic() - began_wall, cpu_seconds(pid) - began_cpu, peak_rss)
