"""``bench/bench_gpu.py --smoke``: the GPU benchmark's code runs on the CPU at tiny sizes, so it
works the first time a GPU appears (CPU numbers are never written to BENCHMARKS.md)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.workflow_util import REPO


def test_gpu_bench_smoke_runs_every_part_on_the_cpu():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--smoke"], capture_output=True,
                          text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.startswith("<!-- bench_gpu.py: begin -->") and out.rstrip().endswith("<!-- bench_gpu.py: end -->")
    for row in ("| eager | 2 |", "| eager | 4 |", "| compile | 2 |", "| compile | 4 |"):
        assert row in out, row  # stage-1 training, with and without torch.compile, two batch sizes
    assert "| DAC 16 kHz" in out and "| w2v-BERT 2.0 to layer 2 (fp32) + semantic codec" in out
    assert "\n| 1 | 20 |" in out and "\n| 2 | 20 |" in out  # synthesis, 20 frames, two batch sizes
