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
import numpy as np
import torch
from omegaconf import DictConfig
from transformers import get_cosine_schedule_with_warmup

from codes.common.augment import RawAugmenter, mixup_batch
from codes.common.batching import BatchCut, cached_training_batches
from codes.common.features import feature_layout
from codes.common.runs import REPO_ROOT, TrainingInterrupted, seed_everything
from codes.common.training import (
    EpochLosses,
    FoldCheckpoints,
    FoldRun,
    NonFiniteLossError,
    build_ema,
    end_epoch,
    fold_predictions,
    initialise_from,
    run_kfold,
)

from .config import register_configs
from .dataset import FoldTensors, RawBatches, drop_modalities, feature_settings, non_imu_columns, split_fold
from .losses import compute_loss
from .model import build_model

STEP_ITEMS = (0, 1, 5)  # the items of a batch with a time axis: features, mask[, shaken steps]

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "build_model", "run_training", "train_fold"]


def build_optimizer(model: torch.nn.Module, trainer_cfg) -> torch.optim.Optimizer:
    """AdamW with its fused kernel (CPU and CUDA): one pass over all parameters instead of a loop.

    With ``trainer.bert_lr_scale`` != 1 the BERT head and the CLS token form a second parameter
    group at ``lr x bert_lr_scale`` (the warm-up and cosine schedule scale both groups).
    """
    if trainer_cfg.bert_lr_scale == 1.0:
        groups = [{"params": list(model.parameters())}]
    else:
        head = {id(p) for p in model.head_parameters()}
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in head]},
            {
                "params": [p for p in model.head_parameters()],
                "lr": trainer_cfg.lr * trainer_cfg.bert_lr_scale,
            },
        ]
    return torch.optim.AdamW(groups, lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay, fused=True)


def training_batches(
    cfg, run: FoldRun, train: FoldTensors, batches: list[torch.Tensor], epoch_seed: int, cached: tuple | None
):
    """An epoch's batches (features, mask, demographics, labels, orientations) on the device: from
    the cached features (``cached``: the fold's tensors, already on the device), or computed from
    augmented raw signals in DataLoader workers (``RawBatches``, pinned memory on CUDA)."""
    cut = BatchCut.from_config(cfg)  # data.pad_to_batch: None = every batch data.max_len steps
    if train.table is None:
        return cached_training_batches(cached, batches, train.mask.sum(dim=1), cut)
    augmenter = RawAugmenter.from_config(cfg.augment, feature_settings(cfg.data).sensor_columns)
    dataset = RawBatches(
        train,
        [b.numpy() for b in batches],
        epoch_seed,
        feature_settings(cfg.data),
        augmenter,
        cfg.data.max_len,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # an item is a whole batch
        num_workers=cfg.machine.num_workers,
        pin_memory=run.device.type == "cuda",
    )
    if cut is not None:  # cut on the host (features, mask and the shaken steps), then moved
        loader = (cut.cut_by_mask(batch, STEP_ITEMS) for batch in loader)
    return ((t.to(run.device, non_blocking=True) for t in batch) for batch in loader)


def train_fold(cfg: DictConfig, run: FoldRun, train: FoldTensors, valid: FoldTensors) -> dict:
    """Train one fold; returns its out-of-fold probabilities and history (the same on every rank)."""
    trainer_cfg, augment_cfg, batch_size = cfg.trainer, cfg.augment, cfg.trainer.batch_size
    seed = trainer_cfg.seed + run.fold
    seed_everything(seed)
    model = run.place(build_model(cfg, train.features.shape[-1]))
    if cfg.model.init_from and not run.resuming:
        initialise_from(model, cfg.model.init_from, run.fold, strict=cfg.model.init_strict)
    ema = build_ema(model, trainer_cfg.ema_decay)
    optimizer = build_optimizer(model, trainer_cfg)
    steps_per_epoch = run.steps_per_epoch(len(train), batch_size)
    if trainer_cfg.drop_last and steps_per_epoch > 1 and len(train) % batch_size:
        steps_per_epoch -= 1  # every batch the same shape (CUDA graphs under machine.compile_mode)
    total_steps = steps_per_epoch * trainer_cfg.epochs
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(trainer_cfg.warmup_ratio * total_steps), total_steps
    )
    checkpoints = FoldCheckpoints(run, model, ema, optimizer, scheduler)
    state = checkpoints.resume()
    trained = run.wrap(model)  # DDP under torchrun, torch.compile when asked for
    evaluated = ema if ema is not None else model
    pos_weight = torch.tensor(trainer_cfg.bce_pos_weight, device=run.device)  # once, not every step
    # without raw-signal augmentation the fold's tensors move to the device once, not every step
    cached = None if train.table is not None else tuple(t.to(run.device) for t in train.to_dataset().tensors)
    feature_groups = feature_layout(feature_settings(cfg.data))[1]
    drop_probs = (cfg.data.sensor_drop_prob, cfg.data.tof_drop_prob, cfg.data.thm_drop_prob)

    while not state.finished and state.epoch < trainer_cfg.epochs:
        started = time.perf_counter()
        epoch_seed = seed * 10_000 + state.epoch  # a resumed run repeats every epoch's randomness
        torch.manual_seed(epoch_seed)
        # this rank's shard in batches (grouped by length with data.group_by_length)
        batches = run.epoch_batches(train.mask.sum(dim=1), batch_size, steps_per_epoch, epoch_seed)
        drop_generator = torch.Generator().manual_seed(epoch_seed + 1)
        mixup_rng = np.random.default_rng([epoch_seed, 2])
        trained.train()
        losses = EpochLosses(run, state.epoch, steps_per_epoch)
        epoch_batches = training_batches(cfg, run, train, batches, epoch_seed, cached)
        for step in losses.steps():
            features, mask, demographics, labels, orientations = next(epoch_batches)
            mix = None
            if augment_cfg.mixup_prob > 0 and mixup_rng.random() < augment_cfg.mixup_prob:
                # the groups from the CPU copy of the orientations: no device-to-host copy
                groups = (
                    train.orientations[batches[step]].numpy() if augment_cfg.mixup_same_orientation else None
                )
                mix = tuple(
                    t.to(run.device, non_blocking=True)
                    for t in mixup_batch(len(batches[step]), augment_cfg.mixup_alpha, mixup_rng, groups)
                )
                partner, lam = mix
                features = lam[:, None, None] * features + (1 - lam[:, None, None]) * features[partner]
                mask = mask | mask[partner]  # padded steps are 0, so the union holds both sequences
            features = drop_modalities(features, feature_groups, drop_probs, drop_generator)
            with run.autocast():
                outputs = trained(features, mask, demographics)
            loss = compute_loss(outputs, labels, trainer_cfg, pos_weight, orientations, mix)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if trainer_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), trainer_cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.add(step, loss, len(batches[step]))
        end_epoch(
            run, state, checkpoints, evaluated, valid, losses.mean(), scheduler.get_last_lr()[0], started
        )
    return fold_predictions(run, state, checkpoints, evaluated, valid)


def raw_augmentation_on(cfg: DictConfig) -> bool:
    """Whether training computes features from augmented raw signals (else the cached features)."""
    return RawAugmenter.from_config(cfg.augment, feature_settings(cfg.data).sensor_columns).active


def run_training(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict | None:
    """The whole k-fold run; returns the metrics on rank 0 (None elsewhere)."""
    return run_kfold(
        cfg,
        train_fold,
        split_fold,
        feature_settings(cfg.data),
        non_imu_columns,
        overrides,
        keep_sensors=raw_augmentation_on(cfg),
    )


register_configs()


@hydra.main(version_base=None, config_path=str(REPO_ROOT / "configs"), config_name="experiment")
def main(cfg: DictConfig) -> None:
    run_training(cfg)


if __name__ == "__main__":
    main()
