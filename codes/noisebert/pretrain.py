"""NoiseBERT pretraining: masked reconstruction of vibrating sequences + the CLS-attention penalty.

    python -m codes.noisebert.pretrain [hydra overrides]
    python -m codes.noisebert.pretrain variant=quick                         # CPU-sized, minutes
    python -m codes.noisebert.pretrain variant=quick regularizer.weight=0    # no penalty
    python -m codes.noisebert.pretrain run_name=r1 trainer.resume=true       # continue a run
    torchrun --nproc_per_node=2 -m codes.noisebert.pretrain ...              # DistributedDataParallel

Data: every train sequence (labels unused) and, with ``data.include_test``, every test
sequence; ``data.valid_fraction`` of the train subjects are held out for validation, whose
noise and masks are drawn once (epoch 0) so that epochs compare. Writes
``outputs/noisebert/<run>/``: config.yaml, overrides.txt, git_commit.txt, packages.txt,
train.log, normalizer.json, last.pt (resume state), best.pt (``{"model": state dict, ...}``,
lowest validation masked MSE: what exp018's ``model.init_from`` takes), metrics.json,
loss_curves.png, cls_attention.png. Under ``torchrun`` each rank trains on its
``DistributedSampler`` shard, every rank validates on the whole validation set, rank 0's
validation MSE decides (best, early stop) and rank 0 writes the files.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from codes.common.batching import BatchCut
from codes.common.checkpoint import load_checkpoint, save_atomically
from codes.common.data_files import TEST_DEMOGRAPHICS_FILE, TEST_FILE, TRAIN_DEMOGRAPHICS_FILE, TRAIN_FILE
from codes.common.data_source import resolve_data_dir
from codes.common.distributed import (
    DistributedContext,
    barrier,
    broadcast_from_main,
    init_distributed,
    run_on_main,
    shutdown_distributed,
)
from codes.common.features import FeatureSettings
from codes.common.folds import FOLD_FILE, data_folds
from codes.common.machine import apply_num_threads, autocast, autocast_dtype
from codes.common.runs import (
    REPO_ROOT,
    TrainingInterrupted,
    begin_run,
    open_run_dir,
    repo_path,
    seed_everything,
    setup_logging,
    write_json_atomically,
)
from codes.common.sequences import FeatureNormalizer, SequenceTable, load_sequence_table
from codes.common.training import check_run_settings, place_model
from codes.noisebert.config import register_configs
from codes.noisebert.dataset import CutCollate, MaskingConfig, NoiseBERTDataset
from codes.noisebert.loss import (
    attention_penalty,
    cls_summary_loss,
    masked_mse,
    noise_region,
    noisy_attention_mass,
)
from codes.noisebert.model import NoiseBERT
from codes.noisebert.noise import VibrationNoiseConfig
from codes.noisebert.plots import plot_cls_attention, plot_loss_curves

logger = logging.getLogger("codes.noisebert.pretrain")


def validation_subjects(subjects: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Bool per sequence: its subject is one of the ``fraction`` of subjects held out (at least one)."""
    unique = np.unique(subjects)
    if not 0.0 < fraction < 1.0 or len(unique) < 2:
        raise ValueError(f"data.valid_fraction must be in (0, 1) with >= 2 subjects, got {fraction}")
    n_valid = max(1, round(fraction * len(unique)))
    held_out = np.random.default_rng(seed).choice(unique, size=n_valid, replace=False)
    return np.isin(subjects, held_out)


def without_fold(
    train_table: SequenceTable, test_table: SequenceTable | None, data_dir: Path, data_cfg: DictConfig
) -> tuple[SequenceTable, SequenceTable | None]:
    """The tables without any sequence of ``data.exclude_fold``'s subjects (strict pretraining:
    the fold's validation subjects are never seen), with the experiments' folds."""
    folds, from_file = data_folds(
        data_dir, train_table.gestures, train_table.subjects, data_cfg.n_folds, data_cfg.fold_seed
    )
    fold = int(data_cfg.exclude_fold)
    if fold not in set(folds.tolist()):
        raise ValueError(f"data.exclude_fold={fold}, but the folds are 0..{int(folds.max())}")
    held_out = np.unique(train_table.subjects[folds == fold])
    logger.info(
        "strict pretraining: fold %d's %d subjects left out (folds from %s)",
        fold, len(held_out), FOLD_FILE if from_file else f"{data_cfg.n_folds} folds, seed {data_cfg.fold_seed}",
    )  # fmt: skip
    train_table = train_table.subset(np.flatnonzero(~np.isin(train_table.subjects, held_out)))
    if test_table is not None:
        test_table = test_table.subset(np.flatnonzero(~np.isin(test_table.subjects, held_out)))
    return train_table, test_table


def interpolation_mse(dataset: NoiseBERTDataset) -> float:
    """Masked MSE of linear interpolation across the masked spans from the visible (noisy) steps.

    Each channel is interpolated from the unmasked real steps of the input; spans at either end
    hold the nearest visible value. The same steps and targets as the model's masked MSE.
    """
    squared, count = 0.0, 0
    for i in range(len(dataset)):
        item = dataset[i]
        real = item["padding_mask"].numpy()
        masked = item["masked"].numpy() & real
        if not masked.any():
            continue
        visible = real & ~masked
        positions = np.arange(len(real))
        inputs, targets = item["input"].numpy(), item["target"].numpy()
        for channel in range(inputs.shape[1]):
            if visible.any():
                guess = np.interp(positions[masked], positions[visible], inputs[visible, channel])
            else:
                guess = np.zeros(masked.sum(), dtype=np.float32)
            squared += float(np.square(guess - targets[masked, channel]).sum())
        count += int(masked.sum()) * inputs.shape[1]
    return squared / max(count, 1)


def pretraining_files(data_cfg: DictConfig) -> list[str]:
    """The data files a pretraining run reads (recorded when it starts, checked when it resumes)."""
    files = [TRAIN_FILE, TRAIN_DEMOGRAPHICS_FILE]
    if data_cfg.include_test:
        files += [TEST_FILE, TEST_DEMOGRAPHICS_FILE]
    if data_cfg.exclude_fold is not None:
        files.append(FOLD_FILE)
    return files


def build_datasets(
    cfg: DictConfig, run_dir: Path, context: DistributedContext
) -> tuple[ConcatDataset, NoiseBERTDataset, int]:
    """Training data (train subjects + test), validation data, number of features."""
    data = cfg.data
    data_dir = resolve_data_dir(
        source=data.source,
        competition_dir=repo_path(cfg.paths.data_dir),
        synthetic_dir=repo_path(cfg.paths.synthetic_dir),
        synthetic_subjects=data.synthetic_subjects,
        synthetic_seed=data.synthetic_seed,
    )
    settings = FeatureSettings(
        use_thm=data.use_thm,
        tof_mode=data.tof_mode,
        mirror_left_handed=data.mirror_left_handed,
        sampling_rate_hz=data.sampling_rate_hz,
    )
    raw = data.noise_domain == "raw"
    if not context.is_main:  # rank 0 generates the synthetic data and fills the cache first
        barrier(context)
    train_table = load_sequence_table(data_dir, "train", settings, keep_sensors=raw)
    test_table = (
        load_sequence_table(data_dir, "test", settings, keep_sensors=raw) if data.include_test else None
    )
    if context.is_main:
        barrier(context)
    run_on_main(lambda: begin_run(cfg, run_dir, data_dir, pretraining_files(data)), context)
    if data.exclude_fold is not None:
        train_table, test_table = without_fold(train_table, test_table, data_dir, data)
    is_valid = validation_subjects(train_table.subjects, data.valid_fraction, data.split_seed)
    fit_table = train_table.subset(np.flatnonzero(~is_valid))
    valid_table = train_table.subset(np.flatnonzero(is_valid))
    tables: list[SequenceTable] = [fit_table] + ([test_table] if test_table is not None else [])
    normalizer = FeatureNormalizer().fit(fit_table)
    if context.is_main:
        write_json_atomically(normalizer.state_dict(), run_dir / "normalizer.json")

    noise_cfg = VibrationNoiseConfig(**OmegaConf.to_container(cfg.noise, resolve=True))
    if noise_cfg.sampling_rate_hz != data.sampling_rate_hz:
        raise ValueError(
            f"noise.sampling_rate_hz={noise_cfg.sampling_rate_hz:g} but data.sampling_rate_hz="
            f"{data.sampling_rate_hz:g}: the bursts' frequencies and durations and the masked spans are "
            "converted with the data's rate; leave noise.sampling_rate_hz out (it follows the data's)"
        )
    masking_cfg = MaskingConfig(**OmegaConf.to_container(cfg.masking, resolve=True))
    seed = cfg.trainer.seed

    def dataset(table: SequenceTable, offset: int) -> NoiseBERTDataset:
        return NoiseBERTDataset.from_sequence_table(
            table, normalizer, data.max_len, noise_cfg, masking_cfg, seed=seed + offset,
            noise_domain=data.noise_domain, settings=settings,
        )  # fmt: skip

    train = ConcatDataset([dataset(table, offset) for offset, table in enumerate(tables)])
    valid = dataset(valid_table, 1000)
    logger.info(
        "pretraining on %d sequences (%d train-file, %s test-file), validating on %d (%d subjects)",
        len(train), fit_table.n_sequences, tables[1].n_sequences if len(tables) > 1 else 0, len(valid),
        len(np.unique(valid_table.subjects)),
    )  # fmt: skip
    return train, valid, train_table.features.shape[1]


def run_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    cfg: DictConfig,
    context: DistributedContext,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    description: str = "",
) -> dict[str, float]:
    """One pass; returns mean total / masked-MSE / regularizer losses and the CLS mass on noisy steps.

    ``model`` is what is called (DDP-wrapped when training under torchrun); training sums are
    added over every rank, so every rank returns the same means.
    """
    device = context.device
    dtype = autocast_dtype(cfg.machine.precision, device)
    reg = cfg.regularizer
    training = optimizer is not None
    model.train(training)
    # running sums stay on the device: one host read per epoch, not several per step
    # loss, masked MSE, regularizer, mass on noisy, samples with noise, CLS objective
    sums = torch.zeros(6, device=device)
    cls_weight = cfg.cls_objective.weight
    n_batches = 0
    with torch.set_grad_enabled(training):
        for batch in tqdm(
            loader, desc=description, leave=False, mininterval=5.0, disable=not context.is_main
        ):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, dtype):
                out = model(batch["input"], batch["padding_mask"], batch["masked"])
            mse = masked_mse(out["reconstruction"], batch["target"], batch["masked"])
            penalty = attention_penalty(
                out["cls_attention"], noise_region(batch, reg.region), reg.form, reg.log_floor
            )
            loss = mse + reg.weight * penalty
            if out["cls_summary"] is not None:
                cls_loss = cls_summary_loss(out["cls_summary"], batch["target"], batch["padding_mask"])
                loss = loss + cls_weight * cls_loss
            else:
                cls_loss = torch.zeros((), device=device)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
                optimizer.step()
                scheduler.step()
            with torch.no_grad():
                noisy = batch["noisy"]
                mass = noisy_attention_mass(out["cls_attention"].detach(), noisy)
                has_noise = noisy.any(dim=1)
                step_sums = torch.stack([loss, mse, penalty, torch.where(has_noise, mass, 0.0).sum(),
                                         has_noise.sum(), cls_loss])  # fmt: skip
                sums += step_sums.detach().float()
            n_batches += 1
    if training and context.is_distributed:
        sums = torch.cat([sums, torch.tensor([float(n_batches)], device=device)])
        dist.all_reduce(sums)
        sums, n_batches = sums[:6], int(sums[6].item())
    loss_sum, mse_sum, penalty_sum, mass_sum, mass_count, cls_sum = sums.tolist()
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"non-finite NoiseBERT loss in {description}")
    means = {
        key: value / max(n_batches, 1)
        for key, value in (
            ("loss", loss_sum),
            ("masked_mse", mse_sum),
            ("regularizer", penalty_sum),
            ("cls_objective", cls_sum),
        )
    }
    means["cls_mass_on_noisy"] = mass_sum / max(mass_count, 1.0)
    return means


def pretrain(cfg: DictConfig, overrides: list[str] | None = None) -> dict | None:
    """The whole run; returns the metrics written to metrics.json (on rank 0; None elsewhere)."""
    check_run_settings(cfg)  # before the run folder is made
    apply_num_threads(cfg.machine.num_threads)
    context = init_distributed(cfg.machine.device, cfg.machine.distributed_timeout_s)
    try:
        with open_run_dir(cfg, context, overrides) as run_dir:
            return _pretrain(cfg, context, run_dir)
    finally:
        shutdown_distributed(context)


def _pretrain(cfg: DictConfig, context: DistributedContext, run_dir: Path) -> dict | None:
    started = time.perf_counter()
    setup_logging(run_dir / "train.log", context.is_main)
    device = context.device
    logger.info(
        "run folder %s, device %s, autocast %s, %d process(es)",
        run_dir, device, autocast_dtype(cfg.machine.precision, device), context.world_size,
    )  # fmt: skip
    seed_everything(cfg.trainer.seed)
    train, valid, n_features = build_datasets(cfg, run_dir, context)

    model = place_model(
        NoiseBERT(
            n_features, cfg.model, cfg.data.max_len, cfg.regularizer.layers, cfg.cls_objective.weight > 0
        ),
        device,
        cfg.machine,
    )
    if cfg.machine.compile:
        model.encoder.compile()  # the Squeezeformer; the hooked BERT layers stay eager
    trained = DistributedDataParallel(model) if context.is_distributed else model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, fused=True
    )
    loader_kwargs = {
        "batch_size": cfg.trainer.batch_size,
        "num_workers": cfg.machine.num_workers,
        "pin_memory": device.type == "cuda",
    }
    cut = BatchCut.from_config(cfg)  # data.pad_to_batch: each batch cut to its longest sequence
    if cut is not None:
        loader_kwargs["collate_fn"] = CutCollate(cut)
    generator = torch.Generator().manual_seed(cfg.trainer.seed)
    drop_last = len(train) > cfg.trainer.batch_size * context.world_size
    if context.is_distributed:  # each rank its shard, reshuffled every epoch (set_epoch)
        sampler = DistributedSampler(train, context.world_size, context.rank, seed=cfg.trainer.seed)
        train_loader = DataLoader(train, sampler=sampler, drop_last=drop_last, **loader_kwargs)
    else:
        sampler = None
        train_loader = DataLoader(
            train, shuffle=True, drop_last=drop_last, generator=generator, **loader_kwargs
        )
    valid_loader = DataLoader(valid, shuffle=False, **loader_kwargs)
    total_steps = len(train_loader) * cfg.trainer.epochs
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(cfg.trainer.warmup_ratio * total_steps), total_steps
    )

    history: list[dict[str, float]] = []
    best_mse, bad_epochs, first_epoch = math.inf, 0, 0
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if cfg.trainer.resume and last_path.is_file():
        state = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history, best_mse, bad_epochs = state["history"], state["best_mse"], state["bad_epochs"]
        first_epoch = state["epoch"] + 1
        logger.info("resumed after epoch %d", state["epoch"])
    baseline = interpolation_mse(valid)
    logger.info("validation masked MSE of linear interpolation: %.4f", baseline)

    for epoch in range(first_epoch, cfg.trainer.epochs):
        if bad_epochs >= cfg.trainer.early_stopping_patience:
            break
        for part in train.datasets:
            part.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        seed_everything(cfg.trainer.seed * 10000 + epoch)  # dropout masks, whether resumed or not
        epoch_started = time.perf_counter()
        train_metrics = run_epoch(trained, train_loader, cfg, context, optimizer, scheduler, f"epoch {epoch}")
        valid_metrics = run_epoch(model, valid_loader, cfg, context, description="valid")
        valid_metrics = broadcast_from_main(valid_metrics, context)  # rank 0's validation decides
        row = {"epoch": epoch, "seconds": time.perf_counter() - epoch_started}
        row |= {f"train_{k}": v for k, v in train_metrics.items()}
        row |= {f"valid_{k}": v for k, v in valid_metrics.items()}
        history.append(row)
        improved = valid_metrics["masked_mse"] < best_mse
        if improved:
            best_mse, bad_epochs = valid_metrics["masked_mse"], 0
        else:
            bad_epochs += 1
        if improved and context.is_main:
            save_atomically(
                {"model": model.state_dict(), "epoch": epoch, "n_features": n_features,
                 "model_config": OmegaConf.to_container(cfg.model, resolve=True)},
                best_path,
            )  # fmt: skip
        if context.is_main:
            save_atomically(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "history": history,
                 "best_mse": best_mse, "bad_epochs": bad_epochs, "epoch": epoch},
                last_path,
            )  # fmt: skip
        barrier(context)
        logger.info(
            "epoch %d: train loss %.4f (mse %.4f, reg %.4f, cls %.4f) | valid mse %.4f, reg %.4f, cls %.4f, "
            "CLS mass on noisy %.3f%s",
            epoch, row["train_loss"], row["train_masked_mse"], row["train_regularizer"], row["train_cls_objective"],
            row["valid_masked_mse"], row["valid_regularizer"], row["valid_cls_objective"],
            row["valid_cls_mass_on_noisy"], " *" if improved else "",
        )  # fmt: skip
        if (
            cfg.trainer.interrupt_after_epochs is not None
            and epoch + 1 - first_epoch >= cfg.trainer.interrupt_after_epochs
        ):
            raise TrainingInterrupted(f"stopped after epoch {epoch}; continue with trainer.resume=true")

    if not context.is_main:
        return None
    best = min(history, key=lambda row: row["valid_masked_mse"])
    metrics = {
        "history": history,
        "best_epoch": best["epoch"],
        "best": {k: v for k, v in best.items() if k.startswith("valid_")},
        "valid_interpolation_mse": baseline,
        "regularizer": OmegaConf.to_container(cfg.regularizer, resolve=True),
        "cls_objective": OmegaConf.to_container(cfg.cls_objective, resolve=True),
        "wall_seconds": time.perf_counter() - started,
    }
    write_json_atomically(metrics, run_dir / "metrics.json")
    plot_loss_curves(history, baseline, run_dir / "loss_curves.png")
    model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
    plot_cls_attention(model, valid, device, run_dir / "cls_attention.png")
    logger.info(
        "best epoch %d: valid masked MSE %.4f (interpolation %.4f), CLS mass on noisy steps %.3f; outputs in %s",
        best["epoch"], best["valid_masked_mse"], baseline, best["valid_cls_mass_on_noisy"], run_dir,
    )  # fmt: skip
    return metrics


register_configs()


@hydra.main(version_base=None, config_path=str(REPO_ROOT / "configs"), config_name="noisebert")
def main(cfg: DictConfig) -> None:
    pretrain(cfg)


if __name__ == "__main__":
    main()
