"""k-fold training of this experiment.

    python codes/exp/<exp>/train.py [hydra overrides]
    python codes/exp/<exp>/train.py variant=quick                      # CPU-sized, minutes
    python codes/exp/<exp>/train.py run_name=r1 trainer.resume=true    # continue an interrupted run
    torchrun --nproc_per_node=2 codes/exp/<exp>/train.py ...           # DistributedDataParallel

This file holds what the experiment's idea changes: the model it builds, the optimizer and the
training step (``train_fold``). Run folders, devices, shards, checkpoints, evaluation and the
outputs are shared functions (``codes/common/training.py``). Writes ``outputs/<exp>/<run>/``:
config.yaml, overrides.txt, git_commit.txt, packages.txt, train.log, fold{k}/best.pt, last.pt and
normalizer.json, oof.parquet, metrics.json, curves.png, confusion_matrix.png.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this folder as its package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    __package__ = f"codes.exp.{Path(__file__).resolve().parent.name}"
    importlib.import_module(__package__)

import hydra
import torch
from omegaconf import DictConfig
from transformers import get_cosine_schedule_with_warmup

from codes.common.batching import BatchCut
from codes.common.runs import REPO_ROOT, TrainingInterrupted, seed_everything
from codes.common.training import (
    EpochLosses,
    FoldCheckpoints,
    FoldRun,
    NonFiniteLossError,
    build_ema,
    end_epoch,
    fold_predictions,
    run_kfold,
)

from .config import register_configs
from .dataset import FoldTensors, drop_sensors, feature_settings, non_imu_columns, split_fold
from .losses import compute_loss
from .model import build_model

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "build_model", "run_training", "train_fold"]


def build_optimizer(model: torch.nn.Module, trainer_cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay)


def train_fold(cfg: DictConfig, run: FoldRun, train: FoldTensors, valid: FoldTensors) -> dict:
    """Train one fold; returns its out-of-fold probabilities and history (the same on every rank)."""
    trainer_cfg, batch_size = cfg.trainer, cfg.trainer.batch_size
    seed = trainer_cfg.seed + run.fold
    seed_everything(seed)
    model = run.place(build_model(cfg, train.features.shape[-1]))
    ema = build_ema(model, trainer_cfg.ema_decay)
    optimizer = build_optimizer(model, trainer_cfg)
    steps_per_epoch = run.steps_per_epoch(len(train), batch_size)
    total_steps = steps_per_epoch * trainer_cfg.epochs
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(trainer_cfg.warmup_ratio * total_steps), total_steps
    )
    checkpoints = FoldCheckpoints(run, model, ema, optimizer, scheduler)
    state = checkpoints.resume()
    trained = run.wrap(model)  # DDP under torchrun, torch.compile when asked for
    evaluated = ema if ema is not None else model
    dataset = train.to_dataset()
    cut = BatchCut.from_config(cfg)

    while not state.finished and state.epoch < trainer_cfg.epochs:
        started = time.perf_counter()
        epoch_seed = seed * 10_000 + state.epoch  # a resumed run repeats every epoch's randomness
        torch.manual_seed(epoch_seed)
        # this rank's shard in batches (grouped by length with data.group_by_length)
        batches = run.epoch_batches(train.mask.sum(dim=1), batch_size, steps_per_epoch, epoch_seed)
        drop_generator = torch.Generator().manual_seed(epoch_seed + 1)
        trained.train()
        losses = EpochLosses(run, state.epoch, steps_per_epoch)
        for step in losses.steps():
            batch = batches[step]
            features, mask, demographics, labels = (t[batch] for t in dataset.tensors)
            if cut is not None:  # data.pad_to_batch: the batch's longest sequence, not data.max_len
                features, mask = cut.cut_by_mask((features, mask), step_items=(0, 1))
            features = drop_sensors(features, run.non_imu_columns, cfg.data.sensor_drop_prob, drop_generator)
            features, mask, demographics, labels = (
                t.to(run.device, non_blocking=True) for t in (features, mask, demographics, labels)
            )
            with run.autocast():
                outputs = trained(features, mask, demographics)
            loss = compute_loss(outputs, labels, trainer_cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if trainer_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), trainer_cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.add(step, loss, len(batch))
        end_epoch(
            run, state, checkpoints, evaluated, valid, losses.mean(), scheduler.get_last_lr()[0], started
        )
    return fold_predictions(run, state, checkpoints, evaluated, valid)


def run_training(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict | None:
    """The whole k-fold run; returns the metrics on rank 0 (None elsewhere)."""
    return run_kfold(cfg, train_fold, split_fold, feature_settings(cfg.data), non_imu_columns, overrides)


register_configs()


@hydra.main(version_base=None, config_path=str(REPO_ROOT / "configs"), config_name="experiment")
def main(cfg: DictConfig) -> None:
    run_training(cfg)


if __name__ == "__main__":
    main()
