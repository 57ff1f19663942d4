"""What an experiment computes does not change when shared code moves (see tests/pinned_runs.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.pinned_runs import (
    EXP019_AS_EXP018,
    PINNED_EXPERIMENTS,
    REFERENCE_DIR,
    comparable_metrics,
    run_pinned,
)


@pytest.mark.parametrize("exp", PINNED_EXPERIMENTS)
def test_tiny_run_gives_the_pinned_metrics_and_oof_probabilities(exp, toy_data, tmp_path):
    metrics, probabilities = run_pinned(exp, toy_data, tmp_path)
    reference = np.load(REFERENCE_DIR / f"{exp}_oof_probabilities.npy")
    machine = json.loads((REFERENCE_DIR / "machine.json").read_text())
    if machine["cpu_capability"] != torch.backends.cpu.get_cpu_capability():
        # other CPU kernels round differently: the same computation, not the same bits
        np.testing.assert_allclose(probabilities, reference, rtol=1e-4, atol=1e-6)
        return
    assert np.array_equal(probabilities, reference), "OOF probabilities differ from the pinned run"
    expected = json.loads((REFERENCE_DIR / f"{exp}_metrics.json").read_text())
    assert json.loads(json.dumps(comparable_metrics(metrics))) == expected


def test_exp019_with_its_recipe_switched_off_computes_exp018(toy_data, tmp_path):
    """exp019's new parts are switches: all off, it is exp018 (the ablation's baseline) bit for bit."""
    _, probabilities = run_pinned("exp019", toy_data, tmp_path, EXP019_AS_EXP018)
    reference = np.load(REFERENCE_DIR / "exp018_oof_probabilities.npy")
    machine = json.loads((REFERENCE_DIR / "machine.json").read_text())
    if machine["cpu_capability"] != torch.backends.cpu.get_cpu_capability():
        np.testing.assert_allclose(probabilities, reference, rtol=1e-4, atol=1e-6)
        return
    assert np.array_equal(probabilities, reference)
