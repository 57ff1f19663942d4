"""Tiny runs of the experiments whose metrics and OOF probabilities are pinned bit for bit.

Moving shared plumbing must not change what an experiment computes. The references in
``tests/data/pinned_runs/`` were written by this module before the plumbing moved; the test
``test_pinned_runs.py`` repeats the runs (same data, seed and thread count) and compares.

    python -m tests.pinned_runs --write      # rewrite the references (only when a change is meant)
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch

from codes.common.schema import GESTURES
from tests.helpers import write_toy_data

PINNED_EXPERIMENTS = ("exp013", "exp018")
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "pinned_runs"
TINY_MODEL = {
    "d_model": 32,
    "num_blocks": 4,
    "num_heads": 4,
    "ff_dim": 64,
    "conv_kernel": 7,
    "demographics_dim": 8,
}
TINY_BERT = {"num_layers": 2, "num_heads": 4}


def pinned_overrides(exp: str, data_dir: Path, output_dir: Path) -> list[str]:
    """The quick variant on the CPU, 2 folds x 3 epochs (batch 8) of a tiny model on the toy data."""
    overrides = [
        "variant=quick",
        "machine=cpu",
        "data=competition",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={output_dir}",
        "run_name=pinned",
        "data.n_folds=2",
        "data.max_len=64",
        "trainer.batch_size=8",
        "trainer.epochs=3",
        *[f"model.{k}={v}" for k, v in TINY_MODEL.items()],
    ]
    if exp in ("exp018", "exp019"):
        overrides += [f"model.bert.{k}={v}" for k, v in TINY_BERT.items()]
    return overrides


# exp019 with every part of its recipe switched off, and exp018's quick schedule: exp018's computation
EXP019_AS_EXP018 = [
    "data.max_len=64",
    "model.dropout=0.1",
    "model.attention_dropout=0.1",
    "model.head_dropout=0.2",
    "model.head_pooling=cls",
    "model.head_norm=false",
    "model.cls_init_std=0.0",
    "model.orientation_head=false",
    "model.bert.position_embeddings=learned",
    "model.bert.hidden_dropout=0.1",
    "model.bert.attention_dropout=0.1",
    "trainer.lr=0.002",
    "trainer.warmup_ratio=0.05",
    "trainer.bert_lr_scale=1.0",
    "trainer.orientation_weight=0.0",
    "trainer.label_smoothing=0.0",
    "trainer.ema_decay=0.999",
    "trainer.early_stopping_patience=5",
    "trainer.drop_last=false",
    "trainer.seeds=null",
    "augment.stretch_prob=0.0",
    "augment.shift_max_steps=0",
    "augment.rotation_prob=0.0",
    "augment.flip_prob=0.0",
    "augment.mixup_prob=0.0",
]


def run_pinned(
    exp: str, data_dir: Path, output_dir: Path, extra: list[str] | None = None
) -> tuple[dict, np.ndarray]:
    """(metrics.json's content, the OOF probabilities (N, 18) in oof.parquet's row order).

    ``extra`` overrides come last (exp019 run as exp018: ``EXP019_AS_EXP018``, with exp018's
    BERT overrides)."""
    from hydra import compose, initialize_config_dir

    importlib.import_module(f"codes.exp.{exp}.config").register_configs()
    train_module = importlib.import_module(f"codes.exp.{exp}.train")
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(
            config_name="experiment", overrides=[*pinned_overrides(exp, data_dir, output_dir), *(extra or [])]
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_module.run_training(cfg)
    finally:
        torch.set_num_threads(threads)
    run_dir = output_dir / exp / "pinned"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    oof = pl.read_parquet(run_dir / "oof.parquet")
    return metrics, oof.select([f"prob_{g}" for g in GESTURES]).to_numpy()


def comparable_metrics(metrics: dict) -> dict:
    """metrics.json without what depends on the clock."""
    overall = {k: v for k, v in metrics["overall"].items() if k != "wall_seconds"}
    folds = {k: {m: v for m, v in f.items() if m != "train_seconds"} for k, f in metrics["folds"].items()}
    return {"overall": overall, "folds": folds, "history": metrics["history"]}


def write_references() -> None:
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        data_dir = write_toy_data(Path(temporary) / "toy_data")
        for exp in PINNED_EXPERIMENTS:
            metrics, probabilities = run_pinned(exp, data_dir, Path(temporary) / "outputs")
            np.save(REFERENCE_DIR / f"{exp}_oof_probabilities.npy", probabilities)
            (REFERENCE_DIR / f"{exp}_metrics.json").write_text(
                json.dumps(comparable_metrics(metrics), indent=1)
            )
    (REFERENCE_DIR / "machine.json").write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "machine": platform.machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="rewrite the references")
    if parser.parse_args().write:
        write_references()
