"""Run a command as a whole process and measure wall time, CPU time and peak RSS of its process tree."""

from __future__ import annotations

import resource
import subprocess
import time
from dataclasses import dataclass

import psutil


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str
    #: user + system CPU seconds of the process and its waited-for children (on a shared machine a
    #: steadier measure of work than wall time, which includes waiting for the cores)
    cpu_seconds: float = 0.0


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cmd: list[str], env: dict | None = None, interval: float = 0.02) -> Measured:
    """Wall time and the peak of the summed RSS over the process and all its children (sampled).

    stdout/stderr go to temporary files, not pipes: a process printing more than a pipe holds
    (a 600-row summary table) would block on a full pipe while we only poll it.
    """
    import tempfile

    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=env)
        ps = psutil.Process(p.pid)
        peak = 0
        while p.poll() is None:
            peak = max(peak, _tree_rss(ps))
            time.sleep(interval)
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        out_f.seek(0)
        err_f.seek(0)
        return Measured(seconds, peak / 2**20, p.returncode, out_f.read(), err_f.read(), cpu)
