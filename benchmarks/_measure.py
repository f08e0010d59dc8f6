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


def fail_above_limits(results: object, keys: set[str], what: str) -> None:
    """Exit 1 with one line when any ratio named in ``keys`` (anywhere in ``results``) is above 1.

    Each of these ratios compares a run with its limit (the raw forward of the same windows, the I/O
    floor, min(device, floor)): above 1, the run did less work than its reference or the reference
    more than the run (another precision, runtime or window count), so the figure is not reported.
    """
    import sys

    found: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                here = f"{path}.{k}" if path else str(k)
                if k in keys and isinstance(v, (int, float)) and v > 1:
                    found.append(f"{here} = {v}")
                walk(v, here)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(results, "")
    if found:
        import json

        # the figures for diagnosis, then the one line that says why they are not a result
        print(json.dumps(results, indent=2), flush=True)
        print(f"{what}: FAILED, above its limit (the run and its reference did not do the same work): "
              f"{'; '.join(found)}", file=sys.stderr)
        sys.exit(1)
