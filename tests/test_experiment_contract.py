"""The contract every experiment folder keeps, tested on every folder in ``codes/exp/``.

``cp -r codes/exp/exp018 codes/exp/exp019`` gets these tests with no edits. An experiment
folder provides: ``config.py`` (``Config``, ``VARIANTS`` with a ``smoke`` variant,
``register_configs``), ``model.py`` (``build_model(cfg, n_features)``: a model called as
``model(features, mask, demographics)`` returning ``gesture_logits`` (B, 18) and
``target_logit`` (B,)), ``losses.py`` (``compute_loss``), ``dataset.py`` (``feature_settings``),
``train.py`` (``run_training``, ``TrainingInterrupted``) and ``inference.py``
(``load_predictor``). The experiment-specific files keep their own extra tests.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from omegaconf import OmegaConf

from codes.common.batching import BatchCut
from codes.common.checkpoint import load_checkpoint, save_atomically
from codes.common.features import feature_layout
from codes.common.schema import GESTURES, NUM_GESTURES, TEST_COLUMNS
from codes.common.training import predict_probabilities
from tests.helpers import experiment_config

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.name for p in (REPO_ROOT / "codes" / "exp").iterdir() if (p / "train.py").is_file())
ATOL = 1e-5


def module(exp: str, name: str):
    return importlib.import_module(f"codes.exp.{exp}.{name}")


def smoke_config(
    exp: str, *overrides: str, data_dir: Path | str = "data", output_dir: Path | str = "outputs"
):
    return experiment_config(exp, "variant=smoke", "machine=cpu", "data=competition",
                             f"paths.data_dir={data_dir}", f"paths.output_dir={output_dir}", *overrides)  # fmt: skip


def without_dropout(cfg):
    """Every ``*dropout*`` value of the model section set to 0 (whatever the experiment names them)."""
    cfg = cfg.copy()

    def walk(node) -> None:
        for key in list(node.keys()):
            if OmegaConf.is_dict(node[key]):
                walk(node[key])
            elif "dropout" in key and isinstance(node[key], float):
                node[key] = 0.0

    walk(cfg.model)
    return cfg


def n_features_of(cfg) -> int:
    return len(feature_layout(module(cfg.exp_name, "dataset").feature_settings(cfg.data))[0])


def build(exp: str, *overrides: str, dropout: bool = True) -> tuple[torch.nn.Module, int]:
    cfg = smoke_config(exp, *overrides)
    cfg = cfg if dropout else without_dropout(cfg)
    torch.manual_seed(0)
    n_features = n_features_of(cfg)
    return module(exp, "model").build_model(cfg, n_features), n_features


def random_batch(lengths: list[int], n_features: int, max_len: int | None = None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    max_len = max_len or max(lengths)
    mask = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    features = torch.randn(len(lengths), max_len, n_features, generator=generator) * mask[..., None]
    demographics = torch.tensor([[1.0, 30.0, 0.0, 1.0, 170.0, 55.0, 30.0]]).repeat(len(lengths), 1)
    return features, mask, demographics


# ---------------------------------------------------------------- config.py is the truth
@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_the_composed_config_is_config_py_s_defaults(exp):
    """Nothing in configs/ overrides a value of the experiment: editing config.py takes effect."""
    cfg = experiment_config(exp)
    defaults = OmegaConf.structured(module(exp, "config").Config)
    for section in ("model", "trainer"):
        assert cfg[section] == defaults[section], section
    data = {k: v for k, v in cfg.data.items() if k != "source"}
    assert data == {k: v for k, v in defaults.data.items() if k != "source"}
    assert cfg.exp_name == exp


@pytest.mark.parametrize("exp", EXPERIMENTS)
@pytest.mark.parametrize("variant", ["quick", "smoke"])
def test_a_variant_changes_exactly_the_values_it_lists(exp, variant):
    config_module = module(exp, "config")
    composed = OmegaConf.to_container(experiment_config(exp, f"variant={variant}"))
    defaults = OmegaConf.to_container(OmegaConf.structured(config_module.Config))
    listed = config_module.VARIANTS[variant]

    def compare(got, default, changes, path=""):
        for key, value in got.items():
            where = f"{path}{key}"
            if isinstance(value, dict):
                compare(value, default[key], (changes or {}).get(key, {}), f"{where}.")
            elif changes and key in changes:
                assert value == changes[key], where
            elif where not in ("data.source",) and not where.startswith(("paths.", "machine.")):
                assert value == default[key], f"{where} changed but {variant} does not list it"

    compare(composed, defaults, listed)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_a_command_line_override_reaches_the_model(exp):
    small, n_features = build(exp, "model.d_model=24")
    large, _ = build(exp, "model.d_model=40")
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in large.parameters())
    projection = small.input_projection  # features (B, T, F) -> (B, T, d_model)
    assert projection.out_features == 24
    # every feature reaches the projection, unless a branch reads some first (exp021's spatial
    # encoder reads the ToF and thermopile columns and hands the projection their embedding)
    branch = getattr(small, "spatial", None)
    expected = n_features if branch is None else projection.in_features
    assert projection.in_features == expected
    if branch is not None:
        assert projection.in_features < n_features


def test_shared_config_groups_hold_only_the_machine():
    """configs/ may set paths, the data source and the machine section, nothing an experiment owns."""
    allowed = ("paths.", "machine.", "data.source")
    for path in sorted((REPO_ROOT / "configs").glob("*/*.yaml")):
        text = path.read_text()
        package = next(line.split()[-1] for line in text.splitlines() if line.startswith("# @package"))
        values = OmegaConf.to_container(OmegaConf.create(text))

        def keys(node, prefix):
            for key, value in node.items():
                yield from keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]

        for key in keys(values, "" if package == "_global_" else f"{package}."):
            assert key.startswith(allowed), f"{path.relative_to(REPO_ROOT)} sets {key}"


# ---------------------------------------------------------------- the model
@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_outputs_do_not_depend_on_padding_or_the_rest_of_the_batch(exp):
    model, n_features = build(exp)
    model.eval()
    lengths = [37, 12, 50]
    features, mask, demographics = random_batch(lengths, n_features, max_len=50)
    with torch.no_grad():
        together = model(features, mask, demographics)
        for i, length in enumerate(lengths):
            longer = torch.cat([features[i : i + 1, :length], torch.zeros(1, 64 - length, n_features)], dim=1)
            alone = model(features[i : i + 1, :length], mask[i : i + 1, :length], demographics[i : i + 1])
            padded_more = model(longer, torch.arange(64)[None] < length, demographics[i : i + 1])
            for key in ("gesture_logits", "target_logit"):
                torch.testing.assert_close(alone[key][0], together[key][i], atol=ATOL, rtol=0)
                torch.testing.assert_close(padded_more[key][0], together[key][i], atol=ATOL, rtol=0)
    assert together["gesture_logits"].shape == (3, NUM_GESTURES) and together["target_logit"].shape == (3,)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_values_at_padded_steps_change_nothing_in_eval_and_training(exp):
    model, n_features = build(exp)
    features, mask, demographics = random_batch([25, 40, 9], n_features, max_len=48)
    garbage = features.clone()
    garbage[~mask] = 1e4
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(features, mask, demographics)["gesture_logits"],
            model(garbage, mask, demographics)["gesture_logits"], atol=ATOL, rtol=0,
        )  # fmt: skip
    model.train()  # BatchNorm statistics and dropout draws must not see padded values either
    outputs = []
    for batch_features in (features, garbage):
        torch.manual_seed(3)  # the same dropout draws
        outputs.append(model(batch_features, mask, demographics)["gesture_logits"].detach())
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


@dataclass
class EvaluationTensors:
    """What ``predict_probabilities`` reads of a validation fold."""

    features: torch.Tensor
    mask: torch.Tensor
    demographics: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_validation_cut_to_each_batch_gives_the_padded_probabilities(exp):
    """``data.pad_to_batch``: batches in length order, each cut to its longest sequence (odd
    lengths, one-step sequences, a batch of only one-step ones), or to 32-step buckets, give the
    probabilities and loss of batches padded to max_len, in the input order."""
    model, n_features = build(exp)
    lengths = [1, 37, 12, 50, 1, 63, 5, 29, 64, 2, 1, 1]
    features, mask, demographics = random_batch(lengths, n_features, max_len=64)
    labels = torch.arange(len(lengths)) % NUM_GESTURES
    tensors = EvaluationTensors(features, mask, demographics, labels)
    cpu = torch.device("cpu")
    padded, padded_loss = predict_probabilities(model, tensors, 4, cpu, None)
    for cut in (BatchCut(64), BatchCut(64, 32)):
        probabilities, loss = predict_probabilities(model, tensors, 4, cpu, None, cut)
        np.testing.assert_allclose(probabilities, padded, atol=ATOL, rtol=0)
        assert abs(loss - padded_loss) < ATOL
        assert np.array_equal(probabilities.argmax(1), padded.argmax(1))


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_a_training_batch_of_one_step_sequences_trains(exp):
    """A batch cut to its longest sequence can be one step long: the time reduction, the
    positional tables and the CLS position still give finite outputs and gradients."""
    model, n_features = build(exp)
    model.train()
    features, mask, demographics = random_batch([1, 1, 1], n_features)
    assert features.shape[1] == 1
    outputs = model(features, mask, demographics)
    loss = module(exp, "losses").compute_loss(outputs, torch.tensor([0, 5, 17]), smoke_config(exp).trainer)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_trainable_parameter_gets_a_gradient(exp):
    """What DistributedDataParallel needs: a parameter without a gradient stalls its reduction."""
    model, n_features = build(exp)
    features, mask, demographics = random_batch([20, 33, 7], n_features)
    outputs = model(features, mask, demographics)
    loss = module(exp, "losses").compute_loss(outputs, torch.tensor([0, 5, 17]), smoke_config(exp).trainer)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters that never get a gradient (freeze them or use them): {missing}"


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_a_tiny_batch_is_overfit(exp):
    model, n_features = build(exp, dropout=False)
    features, mask, demographics = random_batch([30, 22, 41, 17, 35, 28, 40, 19], n_features, seed=1)
    labels = torch.tensor([0, 3, 8, 12, 17, 5, 9, 1])
    trainer_cfg = smoke_config(exp).trainer
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    compute_loss = module(exp, "losses").compute_loss
    for _ in range(200):
        optimizer.zero_grad()
        loss = compute_loss(model(features, mask, demographics), labels, trainer_cfg)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.05
    with torch.no_grad():
        assert (model.eval()(features, mask, demographics)["gesture_logits"].argmax(-1) == labels).all()


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_a_saved_and_reloaded_model_gives_identical_outputs(exp, tmp_path):
    model, n_features = build(exp)
    features, mask, demographics = random_batch([20, 33, 7], n_features)
    save_atomically({"model": model.state_dict()}, tmp_path / "model.pt")
    torch.manual_seed(123)  # another initialisation, overwritten by the load
    reloaded, _ = build(exp)
    reloaded.load_state_dict(load_checkpoint(tmp_path / "model.pt")["model"])
    with torch.no_grad():
        expected, got = (
            model.eval()(features, mask, demographics),
            reloaded.eval()(features, mask, demographics),
        )
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


# ---------------------------------------------------------------- the run
@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_resume_equals_an_uninterrupted_run_and_inference_reproduces_the_oof(exp, toy_data, tmp_path):
    train_module = module(exp, "train")
    common = ("trainer.epochs=3", "trainer.early_stopping_patience=10")
    straight = train_module.run_training(
        smoke_config(exp, "run_name=straight", *common, data_dir=toy_data, output_dir=tmp_path)
    )
    with pytest.raises(train_module.TrainingInterrupted):
        train_module.run_training(smoke_config(exp, "run_name=cut", "trainer.interrupt_after_epochs=2", *common,
                                               data_dir=toy_data, output_dir=tmp_path))  # fmt: skip
    assert not (tmp_path / exp / "cut" / "metrics.json").exists()
    resumed = train_module.run_training(
        smoke_config(
            exp, "run_name=cut", "trainer.resume=true", *common, data_dir=toy_data, output_dir=tmp_path
        )
    )
    assert resumed["history"] == straight["history"]
    assert {k: v for k, v in resumed["overall"].items() if k != "wall_seconds"} == {
        k: v for k, v in straight["overall"].items() if k != "wall_seconds"
    }
    oof = {name: pl.read_parquet(tmp_path / exp / name / "oof.parquet") for name in ("straight", "cut")}
    assert oof["straight"].equals(oof["cut"])
    run_dir = tmp_path / exp / "straight"
    for name in (
        "config.yaml",
        "overrides.txt",
        "git_commit.txt",
        "packages.txt",
        "train.log",
        "metrics.json",
    ):
        assert (run_dir / name).is_file(), name

    # the inference round trip: the saved run answers each out-of-fold sequence as training evaluated it
    predictor = module(exp, "inference").load_predictor(
        run_dir, folds=[0], device="cpu", strict=True, subject_aware=False
    )
    train = pl.read_csv(toy_data / "train.csv")
    demographics = pl.read_csv(toy_data / "train_demographics.csv")
    fold0 = oof["straight"].filter(pl.col("fold") == 0)
    expected = fold0.select([f"prob_{g}" for g in GESTURES]).to_numpy()
    for row, sequence_id in enumerate(fold0["sequence_id"]):
        sequence = train.filter(pl.col("sequence_id") == sequence_id).select(TEST_COLUMNS)
        subject = demographics.filter(pl.col("subject") == sequence["subject"][0])
        got = predictor.predict_probabilities(sequence, subject)
        np.testing.assert_allclose(got, expected[row], atol=1e-4)
        assert predictor.predict(sequence, subject) == GESTURES[int(expected[row].argmax())]


def two_process_run(*arguments: str) -> None:
    """``torchrun --standalone --nproc_per_node=2 <arguments>`` on the CPU (gloo); fails on a non-zero exit."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *arguments,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=400, env=environment, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_two_process_gloo_run_matches_rank_decisions_and_completes(exp, toy_data, tmp_path):
    two_process_run(
        str(REPO_ROOT / "codes" / "exp" / exp / "train.py"), "variant=smoke", "machine=cpu", "data=competition",
        f"paths.data_dir={toy_data}", f"paths.output_dir={tmp_path}", "run_name=ddp", "data.folds=[0]",
        "trainer.batch_size=10",  # 27 training sequences a rank: a last batch of 7
    )  # fmt: skip
    run_dir = tmp_path / exp / "ddp"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["history"]["0"]) == 2 and 0.0 <= metrics["overall"]["score"] <= 1.0
    assert "2 process(es)" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_copied_folder_is_a_working_experiment_with_no_edits(toy_data, tmp_path):
    """cp -r codes/exp/<exp> codes/exp/<new>: the copy trains, names its outputs after itself and predicts."""
    source = EXPERIMENTS[-1]
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "codes", root / "codes", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "configs", root / "configs")
    shutil.copytree(root / "codes" / "exp" / source, root / "codes" / "exp" / "exp999")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    train = [
        sys.executable, str(root / "codes" / "exp" / "exp999" / "train.py"), "variant=smoke", "machine=cpu",
        "data=competition", f"paths.data_dir={toy_data}", "run_name=copy", "data.folds=[1]", "trainer.epochs=1",
    ]  # fmt: skip
    result = subprocess.run(train, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = root / "outputs" / "exp999" / "copy"
    assert OmegaConf.load(run_dir / "config.yaml").exp_name == "exp999"
    assert (run_dir / "overrides.txt").read_text().splitlines()[0] == "variant=smoke"
    test_dir = tmp_path / "test_data"  # three training sequences in the test format
    test_dir.mkdir()
    sequences = pl.read_csv(toy_data / "train.csv").filter(
        pl.col("sequence_id").is_in(["SEQ_000000", "SEQ_000101", "SEQ_000217"])
    )
    sequences.select(TEST_COLUMNS).write_csv(test_dir / "test.csv")
    shutil.copy(toy_data / "train_demographics.csv", test_dir / "test_demographics.csv")
    infer = [sys.executable, str(root / "codes" / "exp" / "exp999" / "inference.py"), f"run_dir={run_dir}",
             f"data={test_dir}", "device=cpu", f"output={tmp_path / 'submission.csv'}"]  # fmt: skip
    result = subprocess.run(infer, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    submission = pl.read_csv(tmp_path / "submission.csv")
    assert submission["sequence_id"].sort().to_list() == ["SEQ_000000", "SEQ_000101", "SEQ_000217"]
    assert set(submission["gesture"]) <= set(GESTURES)


def test_noisebert_two_process_gloo_pretraining_completes(toy_data, tmp_path):
    two_process_run(
        "-m", "codes.noisebert.pretrain", "variant=quick", "machine=cpu", "data=competition", f"paths.data_dir={toy_data}",
        f"paths.output_dir={tmp_path}", "run_name=ddp", "data.include_test=false", "data.valid_fraction=0.34",
        "data.max_len=32", "trainer.batch_size=16", "trainer.epochs=2", "model.d_model=32", "model.num_blocks=4",
        "model.num_heads=4", "model.ff_dim=64", "model.conv_kernel=7", "model.bert.num_layers=2",
        "model.bert.num_heads=4",
    )  # fmt: skip
    run_dir = tmp_path / "noisebert" / "ddp"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and np.isfinite(metrics["best"]["valid_masked_mse"])
    assert "2 process(es)" in (run_dir / "train.log").read_text()
    assert (run_dir / "best.pt").is_file() and (run_dir / "overrides.txt").read_text().startswith(
        "variant=quick"
    )


def test_noisebert_quick_variant_builds_exp018_quick_shapes():
    """Pretraining and fine-tuning with variant=quick give tensors of the same shapes."""
    from hydra import compose, initialize_config_dir

    from codes.noisebert import config as noisebert_config

    noisebert_config.register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base=None):
        pretraining = compose(config_name="noisebert", overrides=["variant=quick"])
    fine_tuning = experiment_config("exp018", "variant=quick")
    for key, value in pretraining.model.items():
        assert fine_tuning.model[key] == value, key
    assert pretraining.data.max_len == fine_tuning.data.max_len


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_training_mode_batchnorm_statistics_do_not_depend_on_the_padding_length(exp):
    _, n_features = build(exp, dropout=False)
    features, mask, demographics = random_batch([25, 40, 9], n_features, max_len=40)
    longer = torch.cat([features, torch.zeros(3, 24, n_features)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(3, 24, dtype=torch.bool)], dim=1)
    states = []
    for batch in ((features, mask), (longer, longer_mask)):
        trained = build(exp, dropout=False)[0].train()  # the same initial weights and statistics
        trained(batch[0], batch[1], demographics)
        states.append({k: v for k, v in trained.state_dict().items() if "running_" in k})
    assert states[0], "no BatchNorm running statistics found"
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-5, rtol=1e-5, msg=key)
