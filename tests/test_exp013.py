"""exp013: the model's mask properties and the whole k-fold training run."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from omegaconf import OmegaConf

from codes.common.machine import autocast_dtype
from codes.common.schema import GESTURES, NUM_GESTURES
from tests.helpers import training_config as _training_config
from tests.pinned_runs import TINY_MODEL

EXP = "exp013"
REPO_ROOT = Path(__file__).resolve().parents[1]
train_module = importlib.import_module(f"codes.exp.{EXP}.train")
model_module = importlib.import_module(f"codes.exp.{EXP}.model")
config_module = importlib.import_module(f"codes.exp.{EXP}.config")


def tiny_model_config(**changes):
    cfg = OmegaConf.structured(config_module.ModelConfig(**{**TINY_MODEL, **changes}))
    return cfg


def make_model(n_features=12, max_len=64, **changes):
    torch.manual_seed(0)
    return model_module.GestureClassifier(n_features, tiny_model_config(**changes), max_len)


def random_batch(lengths, n_features=12, max_len=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    max_len = max_len or max(lengths)
    features = torch.randn(len(lengths), max_len, n_features, generator=generator)
    mask = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    features = features * mask[..., None]
    demographics = torch.tensor([[1.0, 30.0, 0.0, 1.0, 170.0, 55.0, 30.0]]).repeat(len(lengths), 1)
    return features, mask, demographics


# ---------------------------------------------------------------- model
def test_forward_shapes_and_every_parameter_gets_a_gradient():
    model = make_model()
    features, mask, demographics = random_batch([20, 33, 7])
    outputs = model(features, mask, demographics)
    assert outputs["gesture_logits"].shape == (3, NUM_GESTURES)
    assert outputs["target_logit"].shape == (3,)
    (outputs["gesture_logits"].logsumexp(-1).sum() + outputs["target_logit"].sum()).backward()
    for name, parameter in model.named_parameters():
        if "embeddings" in name:  # only the rows of the categories present get a gradient
            continue
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("time_reduction", [True, False])
def test_outputs_do_not_depend_on_padding_or_the_rest_of_the_batch(time_reduction):
    model = make_model(time_reduction=time_reduction).eval()
    features, mask, demographics = random_batch([37, 12, 50], max_len=50)
    with torch.no_grad():
        together = model(features, mask, demographics)["gesture_logits"]
        for i, length in enumerate([37, 12, 50]):
            alone = model(features[i : i + 1, :length], mask[i : i + 1, :length], demographics[i : i + 1])
            longer_features = torch.cat(
                [features[i : i + 1, :length], torch.zeros(1, 64 - length, 12)], dim=1
            )
            longer_mask = torch.arange(64)[None] < length
            padded_more = model(longer_features, longer_mask, demographics[i : i + 1])
            assert torch.allclose(alone["gesture_logits"][0], together[i], atol=1e-5)
            assert torch.allclose(padded_more["gesture_logits"][0], together[i], atol=1e-5)


# ---------------------------------------------------------------- training run
def training_config(toy_data: Path, output_dir: Path, *overrides: str):
    return _training_config(EXP, toy_data, output_dir, TINY_MODEL, *overrides)


def test_a_run_writes_every_output(toy_data, tmp_path):
    cfg = training_config(toy_data, tmp_path, "run_name=full", "trainer.epochs=2")
    metrics = train_module.run_training(cfg)
    run_dir = tmp_path / EXP / "full"
    for name in (
        "config.yaml",
        "git_commit.txt",
        "train.log",
        "oof.parquet",
        "metrics.json",
        "curves.png",
        "confusion_matrix.png",
    ):
        assert (run_dir / name).is_file(), name
    for fold in (0, 1):
        for name in ("best.pt", "last.pt", "normalizer.json"):
            assert (run_dir / f"fold{fold}" / name).is_file()
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["overall"] == pytest.approx(metrics["overall"])
    for key in ("score", "binary_f1", "macro_f1", "score_imu_only"):
        assert 0.0 <= stored["overall"][key] <= 1.0
    assert set(stored["folds"]) == {"0", "1"} and all(
        f["best_epoch"] in (0, 1) for f in stored["folds"].values()
    )
    oof = pl.read_parquet(run_dir / "oof.parquet")
    assert oof.height == 6 * 18 and oof["sequence_id"].n_unique() == oof.height
    probabilities = oof.select([f"prob_{g}" for g in GESTURES]).to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert (np.array(GESTURES)[probabilities.argmax(1)] == oof["predicted_gesture"].to_numpy()).all()
    assert "fold 1 epoch 1" in (run_dir / "train.log").read_text()
    # a finished run folder is never silently overwritten
    with pytest.raises(FileExistsError, match=r"trainer\.resume=true"):
        train_module.run_training(cfg)


def test_a_non_finite_loss_stops_the_fold_naming_epoch_and_step_and_keeps_the_checkpoint(
    toy_data, tmp_path, monkeypatch
):
    real_loss = train_module.compute_loss
    calls = {"n": 0}

    def loss_that_breaks(outputs, labels, trainer_cfg):
        calls["n"] += 1
        loss = real_loss(outputs, labels, trainer_cfg)
        return loss * float("nan") if calls["n"] == 4 else loss  # 2 steps per epoch: epoch 1, step 1

    monkeypatch.setattr(train_module, "compute_loss", loss_that_breaks)
    cfg = training_config(toy_data, tmp_path, "run_name=nan", "trainer.epochs=3", "data.folds=[0]")
    with pytest.raises(train_module.NonFiniteLossError, match=r"epoch 1, step 1"):
        train_module.run_training(cfg)
    last = torch.load(tmp_path / EXP / "nan" / "fold0" / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 1  # the checkpoint of the last good epoch is kept
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_bf16_autocast_path_runs_on_cpu(toy_data, tmp_path):
    cfg = training_config(
        toy_data, tmp_path, "run_name=bf16", "trainer.epochs=1", "data.folds=[0]", "machine.precision=bf16"
    )
    assert autocast_dtype(cfg.machine.precision, torch.device("cpu")) == torch.bfloat16
    metrics = train_module.run_training(cfg)
    assert 0.0 <= metrics["overall"]["score"] <= 1.0


def test_cuda_asked_for_without_a_gpu_warns_and_uses_the_cpu(monkeypatch):
    from codes.common.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA was asked for"):
        assert resolve_device("cuda").type == "cpu"
    assert resolve_device("auto").type == "cpu"
