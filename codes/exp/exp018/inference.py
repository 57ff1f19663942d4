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

The preprocessing is training's (see ``codes/inference/predictor.py``): the fold's saved
normalisation statistics, handedness from the demographics row, the last ``data.max_len``
steps, the IMU-only path for sequences without thermopile and ToF readings; the weights are the
ones training evaluated (EMA when used); the folds' probabilities are averaged.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this folder as its package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    __package__ = f"codes.exp.{Path(__file__).resolve().parent.name}"
    importlib.import_module(__package__)

import torch

from codes.common.distributed import resolve_device
from codes.common.features import feature_layout
from codes.common.runs import REPO_ROOT, setup_logging
from codes.inference.batch import SUBMISSION_FILE, resolve_test_dir, run_batch
from codes.inference.predictor import (
    EnsemblePredictor,
    FoldMember,
    evaluation_autocast_dtype,
    quantize_for_cpu,
)
from codes.inference.run_folder import (
    RunFolderError,
    load_fold_weights,
    load_normalizer,
    load_run_config,
    select_folds,
)

from .dataset import feature_settings
from .model import GestureClassifier

logger = logging.getLogger(__name__)
EXP_NAME = Path(__file__).resolve().parent.name


def build_model(cfg, n_features: int) -> torch.nn.Module:
    """The model exactly as train.py builds it for a fold."""
    return GestureClassifier(n_features, cfg.model, cfg.data.max_len)


def load_predictor(
    run_dir: str | Path,
    folds: Iterable[int] | None = None,
    device: str | torch.device = "auto",
    strict: bool = False,
    quantize: bool = False,
    fold_threads: int = 1,
    precision: str | None = None,
) -> EnsemblePredictor:
    """Every trained fold of ``run_dir`` (or only ``folds``) as one :class:`EnsemblePredictor`.

    ``quantize=True`` (CPU only) turns the Linear layers into dynamic int8 ones: faster, with
    probabilities that differ slightly from training's (see ``quantize_for_cpu``).
    ``fold_threads=2`` runs two fold models at once (on a CPU, with ``torch.set_num_threads(1)``).
    ``precision``: None = training's rule for the run (bf16 autocast on CUDA, fp32 on CPU unless
    the run trained in bf16); ``"bf16"`` forces bf16 autocast (on a CPU with AVX-512 BF16 the
    matrix products run about twice as fast), ``"fp32"`` none.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    trained_by = cfg.get("exp_name")
    if trained_by != EXP_NAME:
        logger.warning("%s was trained by %s; loading it with %s's model code", run_dir, trained_by, EXP_NAME)
    settings = feature_settings(cfg.data)
    n_features = len(feature_layout(settings)[0])
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if quantize and device.type != "cpu":
        raise ValueError(f"quantize=true is a CPU setting; the device is {device}")
    members, kinds = [], set()
    for fold in select_folds(run_dir, folds):
        weights, kind = load_fold_weights(run_dir, fold)
        try:
            model = build_model(cfg, n_features)
            model.load_state_dict(weights)
        except (AttributeError, KeyError, RuntimeError, ValueError) as error:
            raise RunFolderError(
                f"{run_dir}/fold{fold}: the checkpoint does not fit {EXP_NAME}'s model built from the run's "
                f"config (trained by {trained_by}; use codes/exp/{trained_by}/inference.py): {error}"
            ) from error
        model = quantize_for_cpu(model) if quantize else model
        members.append(FoldMember(fold, model, load_normalizer(run_dir, fold)))
        kinds.add(kind)
    predictor = EnsemblePredictor(
        members,
        settings,
        cfg.data.max_len,
        device=device,
        autocast_dtype=evaluation_autocast_dtype(precision or cfg.trainer.precision, device),
        strict=strict,
        fold_threads=fold_threads,
    )
    logger.info(
        "loaded %s folds %s (%s weights%s) on %s in %.2f s",
        run_dir,
        predictor.folds,
        "/".join(sorted(kinds)),
        ", int8 Linear layers" if quantize else "",
        device,
        time.perf_counter() - started,
    )
    return predictor


@dataclass
class InferenceConfig:
    """Batch mode's command-line settings (``key=value``, as in training)."""

    run_dir: str = ""
    data: str = "auto"  # auto | competition | synthetic | a folder with test.csv, test_demographics.csv
    output: str = ""  # default: <run_dir>/submission.csv
    device: str = "auto"
    batch_size: int = 64
    folds: list[int] | None = None  # default: every trained fold
    num_threads: int | None = None  # torch CPU threads; default: torch's own choice
    quantize: bool = False  # CPU: int8 Linear layers (faster, slightly different probabilities)
    fold_threads: int = 1  # fold models run at once for a single sequence (predict(); not batch mode)
    precision: str | None = None  # None = training's rule; bf16 | fp32 to force autocast on or off


def main(argv: Sequence[str] | None = None) -> dict | None:
    from omegaconf import OmegaConf

    args = list(sys.argv[1:] if argv is None else argv)
    cfg = OmegaConf.merge(OmegaConf.structured(InferenceConfig), OmegaConf.from_cli(args))
    setup_logging(None)
    if not cfg.run_dir:
        raise SystemExit(f"run_dir=outputs/{EXP_NAME}/<run> is required (a folder train.py wrote)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run_dir = Path(cfg.run_dir)
    predictor = load_predictor(run_dir, cfg.folds, cfg.device, quantize=cfg.quantize, precision=cfg.precision)
    data_dir = resolve_test_dir(cfg.data, load_run_config(run_dir), REPO_ROOT)
    output = Path(cfg.output) if cfg.output else run_dir / SUBMISSION_FILE
    scores = run_batch(predictor, data_dir, output, batch_size=cfg.batch_size)
    print(f"submission: {output}")
    return scores


if __name__ == "__main__":
    main()
