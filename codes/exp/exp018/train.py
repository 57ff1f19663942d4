"""k-fold training of this experiment.

    python codes/exp/<exp>/train.py [hydra overrides]
    python codes/exp/<exp>/train.py preset=quick                       # CPU, minutes
    python codes/exp/<exp>/train.py run_name=r1 trainer.resume=true    # continue an interrupted run
    torchrun --nproc_per_node=2 codes/exp/<exp>/train.py ...           # DistributedDataParallel

Writes ``outputs/<exp>/<run>/``: config.yaml, git_commit.txt, train.log, fold{k}/best.pt and
last.pt, oof.parquet, metrics.json, curves.png, confusion_matrix.png.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this folder as its package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    __package__ = f"codes.exp.{Path(__file__).resolve().parent.name}"
    importlib.import_module(__package__)

import hydra
import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from codes.common.checkpoint import load_checkpoint, load_matching_weights, save_atomically
from codes.common.data_source import resolve_data_dir
from codes.common.distributed import (
    DistributedContext,
    barrier,
    gather_objects,
    init_distributed,
    shutdown_distributed,
)
from codes.common.ema import get_ema_multi_avg_fn_with_warmup
from codes.common.folds import assign_folds
from codes.common.metric import binary_f1, competition_score, macro_f1
from codes.common.plots import plot_confusion_matrix, plot_fold_curves
from codes.common.runs import REPO_ROOT, git_commit, seed_everything, setup_logging, write_json_atomically
from codes.common.schema import GESTURES
from codes.common.sequences import load_sequence_table

from .config import register_configs
from .dataset import FoldTensors, drop_sensors, feature_settings, non_imu_columns, split_fold, target_labels
from .model import GestureClassifier

logger = logging.getLogger(__name__)
CONFIG_DIR = REPO_ROOT / "configs"
LOSS_READ_EVERY = 20  # training steps between reads of the loss (finiteness check, progress bar)


class TrainingInterrupted(RuntimeError):
    """Raised after ``trainer.interrupt_after_epochs`` epochs; the run continues with trainer.resume=true."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the fold stops and its last good checkpoint is kept."""


def repo_path(path: str) -> Path:
    """Relative config paths are taken from the repository root."""
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def build_optimizer(model: torch.nn.Module, trainer_cfg) -> torch.optim.Optimizer:
    """AdamW with its fused kernel (CPU and CUDA): one pass over all parameters instead of a loop."""
    return torch.optim.AdamW(
        model.parameters(), lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay, fused=True
    )


def autocast_dtype(trainer_cfg, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (precision auto/bf16), none (fp32) on CPU unless bf16 is asked for."""
    if trainer_cfg.precision == "fp32":
        return None
    if trainer_cfg.precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


def compute_loss(outputs: dict[str, torch.Tensor], labels: torch.Tensor, trainer_cfg) -> torch.Tensor:
    """Cross-entropy over the 18 gestures + ``bce_weight`` x BCE on target-vs-non-target."""
    gesture_loss = F.cross_entropy(
        outputs["gesture_logits"].float(), labels, label_smoothing=trainer_cfg.label_smoothing
    )
    pos_weight = torch.tensor(trainer_cfg.bce_pos_weight, device=labels.device)
    target_loss = F.binary_cross_entropy_with_logits(
        outputs["target_logit"].float(), target_labels(labels), pos_weight=pos_weight
    )
    return gesture_loss + trainer_cfg.bce_weight * target_loss


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module,
    tensors: FoldTensors,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[np.ndarray, float]:
    """(N, 18) gesture probabilities and the mean loss of ``tensors``."""
    model.eval()
    probabilities, losses = [], []
    for start in range(0, len(tensors), batch_size):
        batch = slice(start, start + batch_size)
        features = tensors.features[batch].to(device)
        mask = tensors.mask[batch].to(device)
        demographics = tensors.demographics[batch].to(device)
        labels = tensors.labels[batch].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = model(features, mask, demographics)
        losses.append(float(F.cross_entropy(outputs["gesture_logits"].float(), labels, reduction="sum")))
        probabilities.append(outputs["gesture_logits"].float().softmax(-1).cpu().numpy())
    return np.concatenate(probabilities), sum(losses) / max(len(tensors), 1)


def score_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    names = np.array(GESTURES)
    y_true, y_pred = names[labels], names[probabilities.argmax(1)]
    return {
        "score": competition_score(y_true, y_pred),
        "binary_f1": binary_f1(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
    }


@dataclass
class FoldState:
    """What ``last.pt`` holds besides the weights: enough to continue exactly."""

    epoch: int = 0  # epochs completed
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    finished: bool = False


def train_fold(
    cfg: DictConfig,
    fold: int,
    tensors: tuple[FoldTensors, FoldTensors],
    drop_columns: list[int],
    fold_dir: Path,
    context: DistributedContext,
) -> dict:
    """Train one fold; returns its validation probabilities and history (same on every rank)."""
    trainer_cfg = cfg.trainer
    device = context.device
    dtype = autocast_dtype(trainer_cfg, device)
    train, valid = tensors
    valid_imu_only = valid.imu_only(drop_columns)
    seed = trainer_cfg.seed + fold
    seed_everything(seed)

    model = GestureClassifier(train.features.shape[-1], cfg.model, cfg.data.max_len).to(device)
    if cfg.model.init_from and not (trainer_cfg.resume and (fold_dir / "last.pt").is_file()):
        report = load_matching_weights(model, repo_path(cfg.model.init_from))
        logger.info(
            "fold %d: initialised from %s: %d tensors loaded, %d new (%s), %d with another shape (%s), %d unused",
            fold, cfg.model.init_from, len(report["loaded"]), len(report["new"]), ", ".join(report["new"][:8]),
            len(report["mismatched"]), ", ".join(report["mismatched"][:8]), len(report["unused"]),
        )  # fmt: skip
    ema = (
        AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn_with_warmup(trainer_cfg.ema_decay), use_buffers=True
        )
        if trainer_cfg.ema_decay > 0
        else None
    )
    optimizer = build_optimizer(model, trainer_cfg)
    per_rank = math.ceil(len(train) / context.world_size)
    steps_per_epoch = math.ceil(per_rank / trainer_cfg.batch_size)
    total_steps = steps_per_epoch * trainer_cfg.epochs
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(trainer_cfg.warmup_ratio * total_steps), total_steps
    )

    state = FoldState()
    last_path, best_path = fold_dir / "last.pt", fold_dir / "best.pt"
    if trainer_cfg.resume and last_path.is_file():
        checkpoint = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(checkpoint["model"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = FoldState(**checkpoint["state"])
        logger.info("fold %d: resumed after epoch %d", fold, state.epoch)

    trained = DistributedDataParallel(model) if context.is_distributed else model
    if trainer_cfg.compile:
        trained = torch.compile(trained)
    evaluated = ema if ema is not None else model
    dataset = train.to_dataset()
    interrupt_after = trainer_cfg.interrupt_after_epochs
    epochs_this_process = 0

    while not state.finished and state.epoch < trainer_cfg.epochs:
        epoch = state.epoch
        started = time.perf_counter()
        # every epoch's randomness derives from (seed, epoch), so a resumed run repeats it exactly
        torch.manual_seed(seed * 10_000 + epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 10_000 + epoch))
        order = order[context.rank :: context.world_size]  # this rank's shard
        drop_generator = torch.Generator().manual_seed(seed * 10_000 + epoch + 1)
        trained.train()
        step_losses: list[torch.Tensor] = []  # stays on the device; read every LOSS_READ_EVERY steps
        loss_sum, n_seen = 0.0, 0
        progress = tqdm(
            range(steps_per_epoch),
            desc=f"fold {fold} epoch {epoch}",
            leave=False,
            disable=not context.is_main,
        )
        for step in progress:
            batch = order[step * trainer_cfg.batch_size : (step + 1) * trainer_cfg.batch_size]
            features, mask, demographics, labels = (t[batch] for t in dataset.tensors)
            features = drop_sensors(features, drop_columns, cfg.data.sensor_drop_prob, drop_generator)
            features, mask, demographics, labels = (
                t.to(device, non_blocking=True) for t in (features, mask, demographics, labels)
            )
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
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
            step_losses.append(loss.detach() * len(batch))
            n_seen += len(batch)
            if (step + 1) % LOSS_READ_EVERY == 0 or step + 1 == steps_per_epoch:
                # one host sync per LOSS_READ_EVERY steps, not one per step
                read = torch.stack(step_losses).float().cpu()
                bad = torch.nonzero(~torch.isfinite(read)).flatten()
                if len(bad):
                    bad_step = step + 1 - len(read) + int(bad[0])
                    raise NonFiniteLossError(
                        f"fold {fold}: the loss became {read[bad[0]].item()} at epoch {epoch}, step {bad_step}; "
                        f"the last good checkpoint is kept in {last_path}"
                    )
                loss_sum += float(read.sum())
                step_losses.clear()
                progress.set_postfix(loss=f"{loss_sum / n_seen:.4f}")
        train_loss = sum(gather_objects(loss_sum, context)) / max(sum(gather_objects(n_seen, context)), 1)

        # every rank evaluates the whole validation set with identical weights: no broadcast needed
        probabilities, valid_loss = predict_probabilities(
            evaluated, valid, trainer_cfg.batch_size, device, dtype
        )
        imu_probabilities, _ = predict_probabilities(
            evaluated, valid_imu_only, trainer_cfg.batch_size, device, dtype
        )
        scores = score_probabilities(probabilities, valid.labels.numpy())
        imu_score = score_probabilities(imu_probabilities, valid.labels.numpy())["score"]
        state.train_seconds += time.perf_counter() - started
        state.history.append({
            "epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "valid_score": scores["score"],
            "valid_score_imu_only": imu_score, "lr": scheduler.get_last_lr()[0],
        })  # fmt: skip
        improved = scores["score"] > state.best_score
        if improved:
            state.best_score, state.best_epoch, state.epochs_without_improvement = scores["score"], epoch, 0
        else:
            state.epochs_without_improvement += 1
        state.epoch = epoch + 1
        if state.epochs_without_improvement >= trainer_cfg.early_stopping_patience:
            state.finished = True
            logger.info("fold %d: early stop after epoch %d (best epoch %d)", fold, epoch, state.best_epoch)
        if state.epoch >= trainer_cfg.epochs:
            state.finished = True
        if context.is_main:
            logger.info(
                "fold %d epoch %d: train_loss %.4f valid_loss %.4f score %.4f imu_only %.4f%s (%.1f s)",
                fold, epoch, train_loss, valid_loss, scores["score"], imu_score, " *" if improved else "",
                time.perf_counter() - started,
            )  # fmt: skip
            weights = {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None}
            if improved:
                save_atomically({**weights, "epoch": epoch, "score": scores["score"]}, best_path)
            save_atomically(
                {
                    **weights,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": state.__dict__,
                },
                last_path,
            )
        barrier(context)
        epochs_this_process += 1
        if interrupt_after is not None and epochs_this_process >= interrupt_after and not state.finished:
            raise TrainingInterrupted(
                f"fold {fold}: stopped after {epochs_this_process} epoch(s) as asked (trainer.interrupt_after_epochs); "
                "continue with trainer.resume=true"
            )

    # out-of-fold predictions from the best weights (EMA when used)
    best = load_checkpoint(best_path, map_location=device)
    if ema is not None:
        ema.load_state_dict(best["ema"])
    else:
        model.load_state_dict(best["model"])
    probabilities, _ = predict_probabilities(evaluated, valid, trainer_cfg.batch_size, device, dtype)
    imu_probabilities, _ = predict_probabilities(
        evaluated, valid_imu_only, trainer_cfg.batch_size, device, dtype
    )
    return {
        "probabilities": probabilities,
        "imu_probabilities": imu_probabilities,
        "history": state.history,
        "best_epoch": state.best_epoch,
        "train_seconds": state.train_seconds,
    }


def prepare_run_dir(cfg: DictConfig, context: DistributedContext) -> Path:
    """``outputs/<exp>/<run>/``; refuses to reuse a finished or started run unless resuming."""
    run_name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_name = gather_objects(run_name, context)[0]  # every rank uses rank 0's name
    run_dir = repo_path(cfg.paths.output_dir) / cfg.exp_name / run_name
    if context.is_main:
        started = (run_dir / "config.yaml").is_file()
        if started and not cfg.trainer.resume:
            raise FileExistsError(
                f"{run_dir} already holds a run; continue it with trainer.resume=true run_name={run_name}, "
                "or choose another run_name"
            )
        if cfg.trainer.resume and not started:
            raise FileNotFoundError(f"trainer.resume=true but {run_dir} holds no run to continue")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / "git_commit.txt").write_text(git_commit() + "\n")
    barrier(context)
    return run_dir


def write_outputs(
    run_dir: Path, table, folds: np.ndarray, results: dict[int, dict], wall_seconds: float
) -> dict:
    """oof.parquet, metrics.json and the plots."""
    names = np.array(GESTURES)
    parts, per_fold = [], {}
    all_true, all_pred, all_imu = [], [], []
    for fold, result in sorted(results.items()):
        index = np.flatnonzero(folds == fold)
        true = names[table.labels[index]]
        pred = names[result["probabilities"].argmax(1)]
        imu_pred = names[result["imu_probabilities"].argmax(1)]
        all_true.append(true), all_pred.append(pred), all_imu.append(imu_pred)
        frame = pl.DataFrame({
            "sequence_id": table.sequence_ids[index], "fold": np.full(len(index), fold),
            "gesture": true, "predicted_gesture": pred, "predicted_gesture_imu_only": imu_pred,
        })  # fmt: skip
        probabilities = pl.DataFrame(result["probabilities"], schema=[f"prob_{g}" for g in GESTURES])
        parts.append(pl.concat([frame, probabilities], how="horizontal"))
        per_fold[fold] = {
            "score": competition_score(true, pred), "binary_f1": binary_f1(true, pred), "macro_f1": macro_f1(true, pred),
            "score_imu_only": competition_score(true, imu_pred), "best_epoch": result["best_epoch"],
            "train_seconds": result["train_seconds"], "epochs": len(result["history"]),
        }  # fmt: skip
    pl.concat(parts).write_parquet(run_dir / "oof.parquet")
    y_true, y_pred, y_imu = np.concatenate(all_true), np.concatenate(all_pred), np.concatenate(all_imu)
    metrics = {
        "overall": {
            "score": competition_score(y_true, y_pred), "binary_f1": binary_f1(y_true, y_pred),
            "macro_f1": macro_f1(y_true, y_pred), "score_imu_only": competition_score(y_true, y_imu),
            "n_sequences": len(y_true), "wall_seconds": wall_seconds,
        },
        "folds": {str(k): v for k, v in per_fold.items()},
        "history": {str(k): r["history"] for k, r in results.items()},
    }  # fmt: skip
    write_json_atomically(metrics, run_dir / "metrics.json")
    plot_fold_curves({k: r["history"] for k, r in results.items()}, run_dir / "curves.png")
    plot_confusion_matrix(y_true, y_pred, GESTURES, run_dir / "confusion_matrix.png")
    return metrics


def run_training(cfg: DictConfig) -> dict | None:
    """The whole k-fold run; returns the metrics on rank 0 (None elsewhere)."""
    started = time.perf_counter()
    context = init_distributed(cfg.trainer.device)
    try:
        run_dir = prepare_run_dir(cfg, context)
        setup_logging(run_dir / "train.log", context.is_main)
        logger.info("run folder %s, device %s, %d process(es)", run_dir, context.device, context.world_size)
        wandb_run = start_wandb(cfg, run_dir) if context.is_main and cfg.trainer.wandb else None

        data_kwargs = {
            "source": cfg.data.source, "competition_dir": repo_path(cfg.paths.data_dir),
            "synthetic_dir": repo_path(cfg.paths.synthetic_dir), "synthetic_subjects": cfg.data.synthetic_subjects,
            "synthetic_seed": cfg.data.synthetic_seed,
        }  # fmt: skip
        settings = feature_settings(cfg.data)
        if context.is_main:  # rank 0 generates the synthetic data and fills the cache first
            table = load_sequence_table(resolve_data_dir(**data_kwargs), "train", settings)
        barrier(context)
        if not context.is_main:
            table = load_sequence_table(resolve_data_dir(**data_kwargs), "train", settings)
        folds = assign_folds(table.gestures, table.subjects, cfg.data.n_folds, cfg.data.fold_seed)
        selected = list(cfg.data.folds) if cfg.data.folds is not None else list(range(cfg.data.n_folds))
        drop_columns = non_imu_columns(table)

        results = {}
        for fold in selected:
            train, valid, _, normalizer = split_fold(table, folds, fold, cfg.data.max_len)
            fold_dir = run_dir / f"fold{fold}"
            if context.is_main:
                fold_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomically(normalizer.state_dict(), fold_dir / "normalizer.json")
            results[fold] = train_fold(cfg, fold, (train, valid), drop_columns, fold_dir, context)
            if wandb_run is not None:
                for row in results[fold]["history"]:
                    wandb_run.log({f"fold{fold}/{k}": v for k, v in row.items()})
        metrics = None
        if context.is_main:
            metrics = write_outputs(run_dir, table, folds, results, time.perf_counter() - started)
            overall = metrics["overall"]
            logger.info(
                "CV score %.4f (binary F1 %.4f, macro F1 %.4f), IMU-only %.4f; outputs in %s",
                overall["score"], overall["binary_f1"], overall["macro_f1"], overall["score_imu_only"], run_dir,
            )  # fmt: skip
            if wandb_run is not None:
                wandb_run.summary.update(overall)
                wandb_run.finish()
        return metrics
    finally:
        shutdown_distributed(context)


def start_wandb(cfg: DictConfig, run_dir: Path):
    """A Weights & Biases run when the package is installed; never required."""
    try:
        import wandb
    except ImportError:
        logger.warning("trainer.wandb=true but wandb is not installed; logging locally only")
        return None
    return wandb.init(project="cmi-bfrb", name=f"{cfg.exp_name}/{run_dir.name}", dir=str(run_dir),
                      config=OmegaConf.to_container(cfg, resolve=True))  # fmt: skip


register_configs()


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="experiment")
def main(cfg: DictConfig) -> None:
    run_training(cfg)


if __name__ == "__main__":
    main()
