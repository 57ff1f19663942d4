"""Fine-tuning a pretrained stack (``codes/common/finetune.py``) and exp022's CLS attention penalty.

Properties: the stack's levels rise from the input to the top BERT layer, each level learns at
its decayed rate, frozen epochs leave the stack exactly as loaded while the heads learn, a neutral
plan is exactly the cosine schedule and exp022 with it computes exp019, a resumed fine-tuning run
with every lever on equals an uninterrupted one; the classifier's CLS row equals BERT's eager
attention, an EMA copy records on its own, the penalty lowers the CLS mass on shaken steps, and
the shaken steps are exactly the steps whose features differ.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from codes.common.augment import batch_step_features
from codes.common.features import FeatureSettings
from codes.common.finetune import FinetunePlan, finetune_param_groups, finetune_schedule, stack_levels
from codes.common.sequences import pad_step_flags
from codes.noisebert.loss import noisy_attention_mass
from codes.noisebert.noise import SequenceShaker, VibrationNoiseConfig
from tests.helpers import experiment_config
from tests.test_noisebert_data import _raw_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exp022_model(*overrides: str, seed: int = 0):
    from codes.exp.exp022.model import build_model

    cfg = experiment_config("exp022", "variant=smoke", "machine=cpu", *overrides)
    torch.manual_seed(seed)
    return build_model(cfg, 12), cfg


# ---------------------------------------------------------------- levels and rates
def test_stack_levels_rise_from_the_input_to_the_top_bert_layer():
    model, _ = exp022_model()
    levels, heads_level = stack_levels(model)
    assert levels["input_projection.weight"] == 0
    blocks = [
        {v for k, v in levels.items() if k.startswith(f"encoder.blocks.{i}.")}
        for i in range(len(model.encoder.blocks))
    ]
    assert all(len(b) == 1 for b in blocks)  # every tensor of a block at one level
    blocks = [b.pop() for b in blocks]
    assert blocks == list(range(1, len(blocks) + 1))
    assert levels["cls_token"] == levels["bert.embeddings.LayerNorm.weight"] == len(blocks) + 1
    bert_layers = [
        levels[f"bert.encoder.layer.{j}.attention.self.query.weight"]
        for j in range(len(model.bert.encoder.layer))
    ]
    assert bert_layers == list(range(len(blocks) + 2, len(blocks) + 2 + len(bert_layers)))
    assert heads_level == bert_layers[-1] + 1
    assert levels["encoder.time_reduce.pointwise.weight"] == 1 + model.encoder.reduce_after_block
    heads = [n for n, _ in model.named_parameters() if n.split(".")[0] in ("gesture_head", "head_norm")]
    assert heads and not set(heads) & set(levels)


def test_each_level_learns_at_its_decayed_rate():
    model, _ = exp022_model()
    levels, heads_level = stack_levels(model)
    plan = FinetunePlan(layer_decay=0.5, stack_lr_scale=0.8)
    groups = finetune_param_groups(
        model, 1e-3, plan, extra_scale=lambda name: 2.0 if name.startswith("bert.") else 1.0
    )
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]  # BERT's unused word embeddings are frozen
    assert len(rate) == sum(len(g["params"]) for g in groups) == len(trainable)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name in levels:
            expected = (
                1e-3 * 0.8 * 0.5 ** (heads_level - levels[name]) * (2.0 if name.startswith("bert.") else 1.0)
            )
        else:
            expected = 1e-3
        assert math.isclose(rate[id(parameter)], expected, rel_tol=1e-12), name


@pytest.mark.parametrize(
    "bad",
    [{"layer_decay": 0.0}, {"layer_decay": 1.5}, {"freeze_epochs": -1}, {"stack_lr_scale": -0.1},
     {"stack_warmup_epochs": float("nan")}],
)  # fmt: skip
def test_bad_plans_are_refused(bad):
    with pytest.raises(ValueError, match="finetune"):
        FinetunePlan(**bad)


def _step(model, optimizer, scheduler, generator):
    features = torch.randn(4, 20, 12, generator=generator)
    mask = torch.ones(4, 20, dtype=torch.bool)
    loss = model(features, mask)["gesture_logits"].logsumexp(-1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def test_frozen_epochs_leave_the_stack_exactly_as_loaded_while_the_heads_learn():
    """freeze_epochs=1 (3 steps an epoch): after 3 steps every stack tensor is bit-identical (AdamW
    at lr 0 applies no weight decay either) and the heads moved; then the stack's rate ramps up
    over stack_warmup_epochs and the stack moves."""
    model, _ = exp022_model()
    plan = FinetunePlan(layer_decay=0.8, freeze_epochs=1, stack_warmup_epochs=2)
    optimizer = torch.optim.AdamW(finetune_param_groups(model, 1e-2, plan), lr=1e-2, weight_decay=0.1)
    scheduler = finetune_schedule(optimizer, warmup_steps=1, total_steps=30, plan=plan, steps_per_epoch=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    levels, _ = stack_levels(model)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        assert all(g["lr"] == 0.0 for g in optimizer.param_groups if g["stack"]), step
        _step(model, optimizer, scheduler, generator)
    for name, parameter in model.named_parameters():
        if name in levels:
            assert torch.equal(parameter, start[name]), name
    assert not torch.equal(model.gesture_head[0].weight, start["gesture_head.0.weight"])
    # step 3: the first after freezing, 1/6 of the ramp (2 epochs x 3 steps) on top of the cosine
    base = scheduler.lr_lambdas[[g["stack"] for g in optimizer.param_groups].index(False)]
    for group in optimizer.param_groups:
        factor = base(3) * (1 / 6 if group["stack"] else 1.0)
        assert math.isclose(group["lr"], group["initial_lr"] * factor, rel_tol=1e-12)
    _step(model, optimizer, scheduler, generator)
    assert not torch.equal(model.input_projection.weight, start["input_projection.weight"])


def test_a_neutral_plan_is_exactly_the_cosine_schedule():
    from transformers import get_cosine_schedule_with_warmup

    model, _ = exp022_model()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reference = get_cosine_schedule_with_warmup(plain, 5, 40)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = finetune_schedule(optimizer, 5, 40, FinetunePlan(), steps_per_epoch=4)
    for _ in range(40):
        assert scheduler.get_last_lr() == reference.get_last_lr()
        optimizer.step(), plain.step(), scheduler.step(), reference.step()


# ---------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def stack_checkpoint(tmp_path_factory):
    """A "pretrained" stack of the pinned tiny shapes: exp019's tensors from another seed."""
    from tests.pinned_runs import TINY_BERT, TINY_MODEL

    overrides = [
        *(f"model.{k}={v}" for k, v in TINY_MODEL.items()),
        *(f"model.bert.{k}={v}" for k, v in TINY_BERT.items()),
    ]
    model, _ = exp022_model("data.max_len=64", *overrides, seed=123)
    levels, _ = stack_levels(model)
    path = tmp_path_factory.mktemp("stack") / "best.pt"
    # the input projection's width depends on the data's features: it stays new
    stack = {
        k: v for k, v in model.state_dict().items() if k in levels and not k.startswith("input_projection.")
    }
    torch.save({"model": stack}, path)
    return path


def _tiny_run(exp, toy_data, output_dir, *extra):
    from tests.pinned_runs import TINY_BERT, run_pinned

    bert = [f"model.bert.{k}={v}" for k, v in TINY_BERT.items()] if exp in ("exp022", "exp023") else []
    return run_pinned(exp, toy_data, output_dir, [*bert, "trainer.epochs=2", *extra])


def test_exp022_s_defaults_compute_exp019_and_a_decayed_plan_does_not(toy_data, tmp_path, stack_checkpoint):
    """Every lever is off by default (the measured choice): exp022 from a checkpoint is exp019 from
    it, bit for bit; a layer-wise decay changes the run."""
    init = f"model.init_from={stack_checkpoint}"
    metrics_019, oof_019 = _tiny_run("exp019", toy_data, tmp_path / "a", init)
    metrics_022, oof_022 = _tiny_run("exp022", toy_data, tmp_path / "b", init)
    np.testing.assert_array_equal(oof_019, oof_022)
    assert metrics_019["history"] == metrics_022["history"]
    _, oof_decayed = _tiny_run("exp022", toy_data, tmp_path / "c", init, "finetune.layer_decay=0.7")
    assert not np.array_equal(oof_decayed, oof_019)


# exp023 is exp022's code with batches cut and grouped by length (the shaken steps cut with them)
@pytest.mark.parametrize("exp", ["exp023"])
def test_a_resumed_finetuning_run_with_every_lever_on_equals_an_uninterrupted_one(
    exp, toy_data, tmp_path, stack_checkpoint
):
    from codes.common.runs import TrainingInterrupted

    levers = [
        f"model.init_from={stack_checkpoint}", "finetune.freeze_epochs=1", "finetune.stack_warmup_epochs=1",
        "finetune.layer_decay=0.7", "finetune.noise_prob=0.5", "finetune.penalty_weight=0.5",
        "augment.stretch_prob=0.5", "trainer.epochs=3", "trainer.early_stopping_patience=10",
    ]  # fmt: skip
    straight, oof = _tiny_run(exp, toy_data, tmp_path / "straight", *levers)
    with pytest.raises(TrainingInterrupted):
        _tiny_run(exp, toy_data, tmp_path / "cut", *levers, "trainer.interrupt_after_epochs=2")
    resumed, resumed_oof = _tiny_run(exp, toy_data, tmp_path / "cut", *levers, "trainer.resume=true")
    assert resumed["history"] == straight["history"]
    np.testing.assert_array_equal(resumed_oof, oof)


def test_settings_that_cannot_work_are_refused(toy_data, tmp_path, stack_checkpoint):
    with pytest.raises(ValueError, match="noise_prob"):
        _tiny_run("exp022", toy_data, tmp_path / "a", "finetune.penalty_weight=0.1")
    with pytest.raises(ValueError, match="freeze_epochs"):
        _tiny_run(
            "exp022",
            toy_data,
            tmp_path / "b",
            f"model.init_from={stack_checkpoint}",
            "finetune.freeze_epochs=2",
        )


# ---------------------------------------------------------------- the CLS attention penalty
def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 20, 12, generator=generator)
    mask = torch.arange(20)[None] < torch.tensor([20, 13, 6])[:, None]
    return features * mask[..., None], mask


def test_the_classifier_s_cls_row_equals_bert_s_eager_attention():
    """The recorded row (fused SDPA layers) equals the eager ``output_attentions`` CLS row of the
    same weights, with padding, for every layer; under bf16 autocast the row stays float32."""
    model, _ = exp022_model("finetune.penalty_weight=0.1", "finetune.penalty_layers=all")
    eager, _ = exp022_model(
        "finetune.penalty_weight=0.1", "finetune.penalty_layers=all", "model.bert.attn_implementation=eager"
    )
    eager.load_state_dict(model.state_dict())
    model.eval(), eager.eval()
    features, mask = _inputs()
    with torch.no_grad():
        rows = model(features, mask, return_cls_attention=True)["cls_attention"]  # (B, layers, heads, T)
        _, _, attentions = eager.encode(features, mask, output_attentions=True)
    reference = torch.stack([a[:, :, 0, 1:] for a in attentions], dim=1)
    torch.testing.assert_close(rows, reference, atol=1e-5, rtol=0)
    assert torch.equal(rows[2, ..., 6:], torch.zeros_like(rows[2, ..., 6:]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rows_bf16 = model(features, mask, return_cls_attention=True)["cls_attention"]
    assert rows_bf16.dtype == torch.float32
    with pytest.raises(ValueError, match="cls_attention_layers"):
        exp022_model()[0](features, mask, return_cls_attention=True)


def test_an_ema_copy_records_into_its_own_recorder():
    model, _ = exp022_model("finetune.penalty_weight=0.1")
    model.eval()
    copied = copy.deepcopy(model)
    features, mask = _inputs()
    with torch.no_grad():
        rows = copied(features, mask, return_cls_attention=True)["cls_attention"]
        assert not model.cls_attention_recorder._captured and not model.cls_attention_recorder.active
        assert copied.cls_attention_recorder is not model.cls_attention_recorder
        torch.testing.assert_close(rows, model(features, mask, return_cls_attention=True)["cls_attention"])
    assert rows.shape == (3, 1, 4, 20)
    # a recorder attached for one measurement comes off again
    hooks = len(model.bert.encoder.layer[-1].attention.self.query._forward_hooks)
    extra = type(model.cls_attention_recorder)(model.bert, "last")
    extra.remove()
    assert len(model.bert.encoder.layer[-1].attention.self.query._forward_hooks) == hooks


def test_the_penalty_lowers_the_cls_mass_on_shaken_steps():
    model, _ = exp022_model("finetune.penalty_weight=1", seed=3)
    model.eval()  # no dropout: the mass moves only by the gradient
    features, mask = _inputs(1)
    shaken = torch.zeros_like(mask)
    shaken[:, 2:5] = True
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def mass():
        return noisy_attention_mass(model(features, mask, return_cls_attention=True)["cls_attention"], shaken)

    before = mass().detach()
    for _ in range(20):
        optimizer.zero_grad()
        mass().mean().backward()
        optimizer.step()
    after = mass().detach()
    assert (after < before * 0.5).all(), (before, after)  # measured: 0.15, 0.23, 0.50 -> 0.015, 0.013, 0.077


# ---------------------------------------------------------------- shaking training sequences
COLUMNS = tuple(FeatureSettings(use_thm=True, tof_mode="summary").sensor_columns)


def test_no_shake_draws_nothing_and_changes_nothing():
    rows = _raw_rows(40, seed=1).astype(np.float32)
    shaker = SequenceShaker(COLUMNS, 0.0, VibrationNoiseConfig(min_bursts=1), max_len=32)
    rng = np.random.default_rng(0)
    out, shaken = shaker(rows, rng)
    assert out is rows and not shaken.any()
    assert rng.random() == np.random.default_rng(0).random()
    with pytest.raises(ValueError, match="share"):
        SequenceShaker(COLUMNS, 1.5, VibrationNoiseConfig(), max_len=32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_shaken_steps_are_exactly_the_steps_whose_features_differ(seed):
    """Only the last max_len rows vibrate; a step is flagged exactly where its features differ
    from the clean features (the strength threshold is 0 here)."""
    rows = _raw_rows(50, seed=seed).astype(np.float32)
    cfg = VibrationNoiseConfig(min_bursts=1, max_bursts=2, min_burst_seconds=0.4, max_burst_seconds=1.5,
                               strength_threshold=0.0)  # fmt: skip
    shaken_rows, shaken = SequenceShaker(COLUMNS, 1.0, cfg, max_len=32)(rows, np.random.default_rng(seed))
    np.testing.assert_array_equal(shaken_rows[:18], rows[:18])
    assert shaken.any() and not shaken[:18].any()
    settings = FeatureSettings(use_thm=True, tof_mode="summary")
    clean, _ = batch_step_features([rows], np.array([False]), settings)
    noisy, _ = batch_step_features([shaken_rows], np.array([False]), settings)
    differs = ~(
        (clean.features == noisy.features) | (np.isnan(clean.features) & np.isnan(noisy.features))
    ).all(1)
    np.testing.assert_array_equal(differs, shaken)


def test_step_flags_are_cut_and_padded_as_the_features():
    from codes.common.sequences import pad_sequences

    flags = [np.arange(5) % 2 == 0, np.arange(40) >= 35, np.ones(1, dtype=bool)]
    padded = pad_step_flags(flags, 32)
    assert padded.shape == (3, 32)
    np.testing.assert_array_equal(padded[0, :5], flags[0])
    assert not padded[0, 5:].any()
    np.testing.assert_array_equal(padded[1], flags[1][-32:])
    assert padded[2].tolist() == [True] + [False] * 31
    lengths = np.array([len(f) for f in flags])
    table = type("Table", (), {})()  # what pad_sequences reads: the same cut and padding rule
    table.lengths, table.offsets = lengths, np.r_[0, np.cumsum(lengths)]
    table.features = np.concatenate(flags).astype(np.float32)[:, None]
    table.step_valid = np.ones(lengths.sum(), dtype=bool)
    cut = pad_sequences(table, 32)
    np.testing.assert_array_equal(cut.features[..., 0] > 0.5, padded)
