"""Predictions of a trained run of this experiment: the competition's ``predict`` and batch mode.

    python codes/exp/<exp>/inference.py run_dir=outputs/<exp>/<run> data=synthetic
    python codes/exp/<exp>/inference.py run_dir=outputs/<exp>/<run> data=<folder with test.csv> \
        output=submission.csv device=cpu folds=[0,1] batch_size=64

Batch mode reads test.csv and test_demographics.csv, writes ``submission.csv`` (sequence_id,
gesture; default: into the run folder) and prints the competition score when the data has
labels (the synthetic data). ``data`` is a data source (auto | competition | synthetic,
resolved as in training) or a folder.

In code (a Kaggle notebook, a test):

    predictor = load_predictor("outputs/<exp>/<run>")        # loads every fold once
    predictor.predict(sequence, demographics)               # -> one of the 18 gesture strings

What is this experiment's own: the model (``build_model``) and the features
(``feature_settings``); the rest is shared (``codes/inference/experiment.py``: training's
preprocessing, the weights training evaluated, the folds' probabilities averaged).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this folder as its package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    __package__ = f"codes.exp.{Path(__file__).resolve().parent.name}"
    importlib.import_module(__package__)

import torch

from codes.inference.experiment import batch_main, load_run_predictor
from codes.inference.predictor import EnsemblePredictor

from .dataset import feature_settings
from .model import build_model

EXP_NAME = Path(__file__).resolve().parent.name


def load_predictor(
    run_dir: str | Path,
    folds: Iterable[int] | None = None,
    device: str | torch.device = "auto",
    **options,
) -> EnsemblePredictor:
    """Every trained fold of ``run_dir`` (or only ``folds``) as one ensemble; ``options`` are
    :func:`~codes.inference.experiment.load_run_predictor`'s (strict, quantize, fold_threads, precision)."""
    return load_run_predictor(run_dir, EXP_NAME, build_model, feature_settings, folds, device, **options)


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Batch mode (command-line key=value settings; see the module docstring)."""
    return batch_main(load_predictor, EXP_NAME, argv)


if __name__ == "__main__":
    main()
