"""What an experiment computes does not change when shared code moves (see tests/pinned_runs.py).

The references are compared bit for bit on a machine whose numerical environment is the one they
were written in, at a stated tolerance elsewhere; the end of the test run says which comparison
ran. Two more tests keep both branches honest: the same run twice in one session is bit-identical
(what the bit-for-bit pin guards), and the tolerance branch passes with other CPU kernels (a
subprocess with a lower ``ATEN_CPU_CAPABILITY``) yet rejects a run whose learning rate moved by 1%.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.pinned_runs import (
    COMPARISONS,
    EXP019_AS_EXP018,
    PINNED_EXPERIMENTS,
    comparable_metrics,
    compare_with_reference,
    environment_differences,
    numerics_environment,
    run_pinned,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# the next lower kernel set torch can be told to use (ATEN_CPU_CAPABILITY); None: none lower
LOWER_CAPABILITY = {"AVX512": "avx2", "AVX2": "default", "SVE256": "default"}


@pytest.fixture(scope="module")
def pinned_results() -> dict[str, tuple[dict, np.ndarray]]:
    """Each pinned run once per session (the determinism test reuses them)."""
    return {}


def pinned_result(exp: str, toy_data: Path, tmp_path_factory, results: dict) -> tuple[dict, np.ndarray]:
    if exp not in results:
        results[exp] = run_pinned(exp, toy_data, tmp_path_factory.mktemp(f"pinned_{exp}"))
    return results[exp]


@pytest.mark.parametrize("exp", PINNED_EXPERIMENTS)
def test_tiny_run_gives_the_pinned_metrics_and_oof_probabilities(
    exp, toy_data, tmp_path_factory, pinned_results
):
    metrics, probabilities = pinned_result(exp, toy_data, tmp_path_factory, pinned_results)
    print(compare_with_reference(exp, probabilities, metrics))


def test_exp019_with_its_recipe_switched_off_computes_exp018(toy_data, tmp_path):
    """exp019's new parts are switches: all off, it is exp018 (the ablation's baseline)."""
    _, probabilities = run_pinned("exp019", toy_data, tmp_path, EXP019_AS_EXP018)
    print(compare_with_reference("exp019-as-exp018", probabilities, None, reference_name="exp018"))


def test_the_same_run_twice_in_one_session_is_bit_identical(toy_data, tmp_path_factory, pinned_results):
    """What the bit-for-bit pin guards, on any machine: no hidden state, no unseeded randomness."""
    first_metrics, first = pinned_result("exp018", toy_data, tmp_path_factory, pinned_results)
    again_metrics, again = run_pinned("exp018", toy_data, tmp_path_factory.mktemp("pinned_again"))
    assert np.array_equal(first, again), "the same run gave other OOF probabilities in the same session"
    assert comparable_metrics(first_metrics) == comparable_metrics(again_metrics)


def test_the_tolerance_rejects_a_run_with_a_changed_learning_rate(toy_data, tmp_path, monkeypatch):
    """A tolerance wide enough to pass anything would hide a changed computation."""
    monkeypatch.setenv("CMI_PINNED_COMPARISON", "tolerance")
    metrics, probabilities = run_pinned("exp013", toy_data, tmp_path, ["trainer.lr=0.00202"])
    with pytest.raises(AssertionError, match="beyond the tolerance"):
        compare_with_reference("exp013 (lr +1%)", probabilities, metrics, reference_name="exp013")


def test_environment_differences_name_what_differs():
    current = numerics_environment()
    assert environment_differences(current, dict(current)) == []
    other = {**current, "cpu.model name": "Another CPU", "torch_threads": "4"}
    differences = environment_differences(other, current)
    assert len(differences) == 2 and any("Another CPU" in d for d in differences)
    assert environment_differences({}, current)  # a reference without an environment never compares bits


def test_the_tolerance_branch_passes_with_other_cpu_kernels(tmp_path):
    """The pinned runs in a subprocess with a lower torch CPU capability (other vectorised kernels,
    so other rounding) and the tolerance branch forced: they must pass, and say that they compared
    at tolerance. Where no lower capability exists, the kernels are this machine's own."""
    environment = {**os.environ, "CMI_PINNED_COMPARISON": "tolerance", "OMP_NUM_THREADS": "1"}
    lower = LOWER_CAPABILITY.get(torch.backends.cpu.get_cpu_capability())
    if lower is not None:
        environment["ATEN_CPU_CAPABILITY"] = lower
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'base'}",
            "tests/test_pinned_runs.py",
            "-k",
            "pinned_metrics or switched_off",
        ],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    ran = [line for line in output.splitlines() if "at tolerance" in line and "forced" in line]
    assert len(ran) >= 3, output[-4000:]
    COMPARISONS.extend(f"[subprocess, ATEN_CPU_CAPABILITY={lower}] {line}" for line in ran)
