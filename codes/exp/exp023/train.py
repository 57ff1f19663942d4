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
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this folder as its package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    __package__ = f"codes.exp.{Path(__file__).resolve().parent.name}"
    importlib.import_module(__package__)

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from codes.common.augment import RawAugmenter, mixup_batch
from codes.common.batching import BatchCut, cached_training_batches
from codes.common.finetune import FinetunePlan, finetune_param_groups, finetune_schedule
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
from codes.noisebert.loss import attention_penalty
from codes.noisebert.noise import SequenceShaker, VibrationNoiseConfig

from .config import register_configs
from .dataset import FoldTensors, RawBatches, drop_sensors, feature_settings, non_imu_columns, split_fold
from .losses import compute_loss
from .model import build_model

STEP_ITEMS = (0, 1, 5)  # the items of a batch with a time axis: features, mask[, shaken steps]

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "build_model", "run_training", "train_fold"]


def finetune_plan(cfg: DictConfig) -> FinetunePlan:
    """The fine-tuning levers (``finetune.*``): they act on a stack from ``model.init_from`` only
    (a model from scratch has no pretrained stack to protect: the neutral plan)."""
    plan = FinetunePlan.from_config(cfg.finetune)
    if not cfg.model.init_from:
        return FinetunePlan()
    if plan.freeze_epochs >= cfg.trainer.epochs:
        raise ValueError(
            f"finetune.freeze_epochs={plan.freeze_epochs} >= trainer.epochs={cfg.trainer.epochs}: "
            "the pretrained stack would never train; lower finetune.freeze_epochs"
        )
    return plan


def build_optimizer(
    model: torch.nn.Module, trainer_cfg, plan: FinetunePlan | None = None
) -> torch.optim.Optimizer:
    """AdamW with its fused kernel (CPU and CUDA): one pass over all parameters instead of a loop.

    With ``trainer.bert_lr_scale`` != 1 the BERT head and the CLS token learn at ``lr x
    bert_lr_scale``; a non-neutral fine-tuning ``plan`` gives each level of the pretrained stack its
    own group (``codes/common/finetune.py``); the warm-up and cosine schedule scale every group.
    """
    head = {id(p) for p in model.head_parameters()}
    if plan is not None and not plan.neutral:
        head_names = {name for name, p in model.named_parameters() if id(p) in head}
        groups = finetune_param_groups(
            model,
            trainer_cfg.lr,
            plan,
            extra_scale=lambda name: trainer_cfg.bert_lr_scale if name in head_names else 1.0,
        )
    elif trainer_cfg.bert_lr_scale == 1.0:
        groups = [{"params": list(model.parameters())}]
    else:
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in head]},
            {
                "params": [p for p in model.head_parameters()],
                "lr": trainer_cfg.lr * trainer_cfg.bert_lr_scale,
            },
        ]
    return torch.optim.AdamW(groups, lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay, fused=True)


def sequence_shaker(cfg: DictConfig) -> SequenceShaker | None:
    """The raw vibration of ``finetune.noise_prob`` of the training sequences (None when 0): the
    pretraining's noise model at the data's sampling rate, 1-3 bursts per shaken sequence."""
    finetune_cfg = cfg.finetune
    if finetune_cfg.penalty_weight > 0 and finetune_cfg.noise_prob <= 0:
        raise ValueError(
            f"finetune.penalty_weight={finetune_cfg.penalty_weight} needs shaken sequences to penalise: "
            "set finetune.noise_prob > 0"
        )
    if finetune_cfg.noise_prob <= 0:
        return None
    noise_cfg = replace(VibrationNoiseConfig(min_bursts=1), sampling_rate_hz=cfg.data.sampling_rate_hz)
    columns = tuple(feature_settings(cfg.data).sensor_columns)
    return SequenceShaker(columns, float(finetune_cfg.noise_prob), noise_cfg, cfg.data.max_len)


def training_batches(
    cfg, run: FoldRun, train: FoldTensors, batches: list[torch.Tensor], epoch_seed: int, cached: tuple | None
):
    """An epoch's batches (features, mask, demographics, labels, orientations[, shaken steps]) on
    the device: from the cached features (``cached``: the fold's tensors, already on the device),
    or computed from augmented (and shaken) raw signals in DataLoader workers (``RawBatches``,
    pinned memory on CUDA)."""
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
        sequence_shaker(cfg),
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
    plan = finetune_plan(cfg)
    optimizer = build_optimizer(model, trainer_cfg, plan)
    steps_per_epoch = run.steps_per_epoch(len(train), batch_size)
    if trainer_cfg.drop_last and steps_per_epoch > 1 and len(train) % batch_size:
        steps_per_epoch -= 1  # every batch the same shape (CUDA graphs under machine.compile_mode)
    total_steps = steps_per_epoch * trainer_cfg.epochs
    scheduler = finetune_schedule(
        optimizer, int(trainer_cfg.warmup_ratio * total_steps), total_steps, plan, steps_per_epoch
    )
    penalty_weight = cfg.finetune.penalty_weight
    checkpoints = FoldCheckpoints(run, model, ema, optimizer, scheduler)
    state = checkpoints.resume()
    trained = run.wrap(model)  # DDP under torchrun, torch.compile when asked for
    evaluated = ema if ema is not None else model
    pos_weight = torch.tensor(trainer_cfg.bce_pos_weight, device=run.device)  # once, not every step
    # without raw-signal augmentation the fold's tensors move to the device once, not every step
    cached = None if train.table is not None else tuple(t.to(run.device) for t in train.to_dataset().tensors)

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
            features, mask, demographics, labels, orientations, *shaken = next(epoch_batches)
            shaken = shaken[0] if shaken else None  # (B, L) bool with finetune.noise_prob > 0
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
                if shaken is not None:
                    shaken = shaken | shaken[partner]
            features = drop_sensors(features, run.non_imu_columns, cfg.data.sensor_drop_prob, drop_generator)
            penalised = penalty_weight > 0 and shaken is not None
            with run.autocast():
                outputs = trained(features, mask, demographics, return_cls_attention=penalised)
            loss = compute_loss(outputs, labels, trainer_cfg, pos_weight, orientations, mix)
            if penalised:  # lambda x the CLS attention mass on the shaken steps (float32)
                loss = loss + penalty_weight * attention_penalty(outputs["cls_attention"], shaken, "mass")
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
    """Whether training computes features from augmented or shaken raw signals (else the cached
    features)."""
    augmenter = RawAugmenter.from_config(cfg.augment, feature_settings(cfg.data).sensor_columns)
    return augmenter.active or cfg.finetune.noise_prob > 0


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
