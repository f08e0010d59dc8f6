"""The chaos run, short: the nightly deployment over a flaky bucket with a worker killed mid-run
(``benchmarks/chaos.py`` holds the run; the reliability figure in docs/benchmarks.md is its long form)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_nightly_survives_a_flaky_bucket_and_a_killed_worker(tmp_path, model_dir):
    from chaos import run_chaos

    report = run_chaos(tmp_path, images=6, side=128, rate=0.04, kill=True, seed=1, kill_after=0.25,
                       model=model_dir, log=print)
    assert report["completed"] and report["statuses"] == ["done"], report
    assert report["killed_after_chunks"] is not None  # a worker process died with the run under way
    assert report["faults_total"] >= 0.02 * report["requests"] > 0, report  # ≥ 2 % of the bucket's requests
    # nothing lost: every chunk object of every level equals the clean run's; nothing left locked
    assert report["outputs_identical"] and report["chunks_differing"] == 0, report
    assert report["outputs_complete"] == 6 and report["locks_left"] == 0, report
    # the log names the retries: one note per image that retried, the rows count them
    assert report["log_lines_naming_retries"] == report["images_with_retries"], report
    assert report["log_lines_naming_lost_worker"] == report["images_recomputed"], report
