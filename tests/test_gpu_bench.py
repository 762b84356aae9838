"""The GPU benchmark's CPU smoke mode: the real path (catalog rendered, served over loopback, ingested; Ray Train;
the real loader) end to end at `tiny` sizes, so the script that measures a GPU node keeps working without one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_train_benchmark_runs_the_real_path_in_smoke_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--smoke", "--workdir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.strip().startswith("tiny:"))
    rate = float(re.search(r"([\d.]+) samples/s per GPU", line).group(1))
    wait = float(re.search(r"data wait\s+([\d.]+)%", line).group(1))
    assert rate > 0 and 0 <= wait <= 100
    assert (tmp_path / "data" / "openmoji-32px-200" / "manifest.parquet").exists()  # ingested, not synthetic
