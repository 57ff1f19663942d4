"""exp019's own parts: the loss with mixup and the orientation head, the BERT-head switches, and
several seeds per fold averaged at inference (the contract suite covers the rest)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from codes.common.schema import GESTURES, TEST_COLUMNS
from codes.exp.exp019.dataset import target_labels
from codes.exp.exp019.losses import compute_loss
from codes.exp.exp019.model import build_model
from codes.exp.exp019.train import build_optimizer, run_training
from tests.helpers import experiment_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smoke(*overrides: str, data_dir="data", output_dir="outputs"):
    return experiment_config(
        "exp019", "variant=smoke", "machine=cpu", "data=competition",
        f"paths.data_dir={data_dir}", f"paths.output_dir={output_dir}", *overrides,
    )  # fmt: skip


def outputs_for(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "gesture_logits": torch.randn(batch, 18, generator=generator),
        "target_logit": torch.randn(batch, generator=generator),
        "orientation_logits": torch.randn(batch, 4, generator=generator),
    }


def test_mixed_loss_is_the_lam_weighted_loss_of_both_labels():
    cfg = smoke("trainer.orientation_weight=0.5").trainer
    outputs, pos_weight = outputs_for(6), torch.tensor(2.0)
    labels = torch.tensor([0, 9, 3, 17, 8, 1])
    orientations = torch.tensor([0, 1, 2, 3, 1, 0])
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    ones = torch.ones(6)
    unmixed = compute_loss(outputs, labels, cfg, pos_weight, orientations)
    assert compute_loss(outputs, labels, cfg, pos_weight, orientations, (partner, ones)) == pytest.approx(
        float(unmixed), rel=1e-6
    )
    lam = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    logits = outputs["gesture_logits"]
    gesture = (lam * F.cross_entropy(logits, labels, reduction="none")
               + (1 - lam) * F.cross_entropy(logits, labels[partner], reduction="none")).mean()  # fmt: skip
    target = (lam * F.binary_cross_entropy_with_logits(outputs["target_logit"], target_labels(labels), pos_weight=pos_weight, reduction="none")
              + (1 - lam) * F.binary_cross_entropy_with_logits(outputs["target_logit"], target_labels(labels[partner]), pos_weight=pos_weight, reduction="none")).mean()  # fmt: skip
    o = outputs["orientation_logits"]
    orientation = (lam * F.cross_entropy(o, orientations, reduction="none")
                   + (1 - lam) * F.cross_entropy(o, orientations[partner], reduction="none")).mean()  # fmt: skip
    expected = gesture + cfg.bce_weight * target + 0.5 * orientation
    got = compute_loss(outputs, labels, cfg, pos_weight, orientations, (partner, lam))
    assert float(got) == pytest.approx(float(expected), rel=1e-6)


def test_unknown_orientations_do_not_count():
    cfg = smoke("trainer.orientation_weight=1.0").trainer
    outputs, labels = outputs_for(4), torch.tensor([0, 1, 2, 3])
    known = torch.tensor([2, 1, -1, -1])
    first = compute_loss(outputs, labels, cfg, torch.tensor(1.0), known)
    changed = {**outputs, "orientation_logits": outputs["orientation_logits"].clone()}
    changed["orientation_logits"][2:] += 100.0  # logits of the unknown rows
    assert compute_loss(changed, labels, cfg, torch.tensor(1.0), known) == first
    without = compute_loss(outputs, labels, smoke().trainer, torch.tensor(1.0), known)
    assert first > without


def test_bert_lr_scale_gives_the_head_its_own_rate_and_covers_every_parameter_once():
    cfg = smoke("trainer.bert_lr_scale=0.25", "trainer.lr=0.002")
    model = build_model(cfg, 44)
    optimizer = build_optimizer(model, cfg.trainer)
    body, head = optimizer.param_groups
    assert body["lr"] == 0.002 and head["lr"] == pytest.approx(0.0005)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    assert any(p is model.cls_token for p in head["params"])


def test_switched_off_bert_position_embeddings_stay_zero_and_cls_init_is_random():
    cfg = smoke("model.bert.position_embeddings=none", "model.cls_init_std=0.02", "model.head_norm=true")
    model = build_model(cfg, 44)
    table = model.bert.embeddings.position_embeddings.weight
    assert not table.requires_grad and torch.count_nonzero(table) == 0
    assert model.cls_token.std() > 0.005
    assert isinstance(model.head_norm, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="position_embeddings"):
        build_model(smoke("model.bert.position_embeddings=sinusoidal"), 44)


def test_seeds_are_averaged_in_the_oof_and_at_inference(toy_data, tmp_path):
    cfg = smoke("trainer.seeds=[3,4]", "trainer.epochs=1", "run_name=seeds", "data.folds=[0]",
                data_dir=toy_data, output_dir=tmp_path)  # fmt: skip
    run_training(cfg)
    run_dir = tmp_path / "exp019" / "seeds"
    assert (run_dir / "fold0" / "best.pt").is_file() and (run_dir / "fold0" / "seed4" / "best.pt").is_file()
    from codes.exp.exp019.inference import load_predictor

    both = load_predictor(run_dir, device="cpu", strict=True, subject_aware=False)
    assert len(both.members) == 2
    oof = pl.read_parquet(run_dir / "oof.parquet")
    expected = oof.select([f"prob_{g}" for g in GESTURES]).to_numpy()
    train = pl.read_csv(toy_data / "train.csv")
    demographics = pl.read_csv(toy_data / "train_demographics.csv")
    first_member_differs = False
    for row, sequence_id in enumerate(oof["sequence_id"][:5]):
        sequence = train.filter(pl.col("sequence_id") == sequence_id).select(TEST_COLUMNS)
        subject = demographics.filter(pl.col("subject") == sequence["subject"][0])
        got = both.predict_probabilities(sequence, subject)
        np.testing.assert_allclose(got, expected[row], atol=1e-4)
        both.members, saved = both.members[:1], both.members
        alone = both.predict_probabilities(sequence, subject)
        both.members = saved
        first_member_differs |= not np.allclose(alone, expected[row], atol=1e-4)
    assert first_member_differs  # the average is not just the first seed's model


def test_init_from_a_checkpoint_of_other_model_settings_raises_unless_not_strict(toy_data, tmp_path):
    """``model.init_from`` with a checkpoint of another preset (other d_model) is an error naming
    ``model.init_strict``; ``model.init_strict=false`` trains from what fits. A checkpoint of the
    same settings loads every stack tensor."""
    from codes.common.checkpoint import save_atomically
    from codes.common.features import feature_layout
    from codes.common.training import initialise_from
    from codes.exp.exp019.dataset import feature_settings

    cfg = smoke()
    n_features = len(feature_layout(feature_settings(cfg.data))[0])
    torch.manual_seed(0)
    other = build_model(smoke("model.d_model=48"), n_features)
    save_atomically({"model": other.state_dict()}, tmp_path / "other.pt")
    same = build_model(cfg, n_features)
    save_atomically({"model": same.state_dict()}, tmp_path / "same.pt")

    torch.manual_seed(1)
    model = build_model(cfg, n_features)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.init_strict=false"):
        initialise_from(model, str(tmp_path / "other.pt"), fold=0)
    initialise_from(model, str(tmp_path / "other.pt"), fold=0, strict=False)  # loads what fits
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and len(changed) < len(before)
    initialise_from(model, str(tmp_path / "same.pt"), fold=0)  # strict, nothing mismatched
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in model.state_dict().items())

    run = smoke("run_name=strict", "trainer.epochs=1", "data.folds=[0]", f"model.init_from={tmp_path / 'other.pt'}",
                data_dir=toy_data, output_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="another shape"):
        run_training(run)


def test_noise_robustness_reproduces_the_clean_cv_and_scores_shaken_copies(toy_data, tmp_path):
    """benchmarks/noise_robustness.py on a tiny trained run: the clean condition reproduces the
    run's own CV (the script checks it to 1e-9 and raises otherwise), the shaken copies change the
    IMU features of some sequences and leave every thermopile/ToF feature alone, and the summary's
    loss ratios are the arithmetic they claim."""
    from benchmarks import noise_robustness

    run_training(smoke("run_name=tiny", "trainer.epochs=1", data_dir=toy_data, output_dir=tmp_path))
    run_dir = tmp_path / "exp019" / "tiny"
    tables: dict = {}
    result = noise_robustness.score_run(run_dir, [2.0], seed=0, tables=tables, cls_mass=True)
    assert set(result) == {"clean", "x2"}
    for condition in result.values():
        assert 0.0 <= condition["score"] <= 1.0 and 0.0 <= condition["score_imu_only"] <= 1.0
    assert 0.0 < result["x2"]["cls_mass_on_shaken"] < 1.0 and 0.0 < result["x2"]["shaken_step_share"] < 1.0
    ((table, conditions, shaken_steps, _),) = tables.values()
    # the mass is a share of the CLS attention over the steps: 1 when every real step is shaken
    from codes.exp.exp019.dataset import make_tensors
    from codes.exp.exp019.inference import load_predictor

    member = load_predictor(run_dir, device="cpu").members[0]
    model, tensors = member.model, make_tensors(table.subset(np.arange(8)), member.normalizer, 64)
    total, count = noise_robustness.cls_mass_on_shaken(model, tensors, np.ones((8, 64), dtype=bool))
    assert count == 8 and total == pytest.approx(8.0, abs=1e-5)
    assert noise_robustness.cls_mass_on_shaken(model, tensors, np.zeros((8, 64), dtype=bool)) == (0.0, 0)
    shaken = conditions["x2"]
    imu = table.feature_groups["imu"]
    assert not np.array_equal(shaken.features[:, imu], table.features[:, imu])
    other = [c for c in range(table.features.shape[1]) if c not in imu]
    np.testing.assert_array_equal(shaken.features[:, other], table.features[:, other])
    # the same seed shakes the same way: a second run folder sees the very same data
    again, again_steps = noise_robustness.shaken_table(table, shaken_settings(run_dir), 2.0, 0, 10.0)
    np.testing.assert_array_equal(again.features, shaken.features)
    assert all(np.array_equal(a, b) for a, b in zip(again_steps, shaken_steps["x2"], strict=True))

    def runs(clean: float, shaken_score: float) -> dict:
        row = {"score": clean, "score_imu_only": clean}
        return {"r": {"clean": row, "x1": {"score": shaken_score, "score_imu_only": shaken_score}}}

    lines = noise_robustness.summarise({"a": runs(0.8, 0.7), "b": runs(0.8, 0.6)}, [1.0])
    assert "- score x1: a loses +50% less than b" in lines  # losses 0.1 and 0.2


def shaken_settings(run_dir):
    from codes.exp.exp019.dataset import feature_settings
    from codes.inference.run_folder import load_run_config

    return feature_settings(load_run_config(run_dir).data)
