"""``benchmarks/gpu_check.sh --dry-run``: the GPU check's commands, end to end, on the CPU in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_script_runs_its_six_settings_on_the_cpu():
    outputs = REPO_ROOT / "outputs"
    before = set(outputs.rglob("gpu_check*")) if outputs.is_dir() else set()
    environment = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and " cpu " in line]
    names = ["bf16", "compile", "reduce-overhead", "bf16-cut", "compile-bucketed", "reduce-overhead-bucketed"]
    assert [row.split("|")[1].strip() for row in rows] == names
    assert "modes asked for: ['default']" in rows[1] and "modes asked for: ['reduce-overhead']" in rows[2]
    assert "modes asked for: ['default']" in rows[4] and "modes asked for: ['reduce-overhead']" in rows[5]
    assert "off" in rows[0].split("|")[3] and "off" in rows[3].split("|")[3]
    after = set(outputs.rglob("gpu_check*")) if outputs.is_dir() else set()
    assert after == before  # the dry run writes only to its temporary folder
