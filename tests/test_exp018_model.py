"""exp018: the Squeezeformer + CLS token + BertModel head."""

from __future__ import annotations

import importlib

import pytest
import torch
from omegaconf import OmegaConf

from codes.common.checkpoint import load_matching_weights, save_atomically
from codes.common.schema import NUM_GESTURES
from tests.helpers import training_config

EXP = "exp018"
model_module = importlib.import_module(f"codes.exp.{EXP}.model")
config_module = importlib.import_module(f"codes.exp.{EXP}.config")
train_module = importlib.import_module(f"codes.exp.{EXP}.train")

N_FEATURES = 12
TINY = {"d_model": 32, "num_blocks": 4, "num_heads": 4, "ff_dim": 64, "conv_kernel": 7, "demographics_dim": 8}
TINY_BERT = {"num_layers": 2, "num_heads": 4}


def model_config(bert=None, **changes):
    cfg = OmegaConf.structured(config_module.ModelConfig(**{**TINY, **changes}))
    for key, value in {**TINY_BERT, **(bert or {})}.items():
        cfg.bert[key] = value
    return cfg


def make_model(max_len=64, bert=None, **changes):
    torch.manual_seed(0)
    return model_module.GestureClassifier(N_FEATURES, model_config(bert, **changes), max_len)


def random_batch(lengths, max_len=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    max_len = max_len or max(lengths)
    mask = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    features = torch.randn(len(lengths), max_len, N_FEATURES, generator=generator) * mask[..., None]
    demographics = torch.tensor([[1.0, 30.0, 0.0, 1.0, 170.0, 55.0, 30.0]]).repeat(len(lengths), 1)
    return features, mask, demographics


def test_model_initialises_from_a_config_without_downloading():
    model = make_model()
    assert model.bert.config.num_hidden_layers == 2 and model.bert.config.hidden_size == 32
    assert model.bert.pooler is None  # add_pooling_layer=False
    assert model.bert.config.max_position_embeddings == 65  # max_len + the CLS position
    assert torch.equal(model.cls_token, torch.zeros(1, 1, 32))
    assert isinstance(model.bert_projection, torch.nn.Identity)
    wider = make_model(bert={"hidden_size": 48})
    assert isinstance(wider.bert_projection, torch.nn.Linear) and wider.bert_projection.out_features == 48


@pytest.mark.parametrize("hidden_size", [None, 48])
def test_forward_shapes_and_every_used_parameter_gets_a_gradient(hidden_size):
    model = make_model(bert={"hidden_size": hidden_size})
    features, mask, demographics = random_batch([20, 33, 7])
    outputs = model(features, mask, demographics)
    assert outputs["gesture_logits"].shape == (3, NUM_GESTURES) and outputs["target_logit"].shape == (3,)
    (outputs["gesture_logits"].logsumexp(-1).sum() + outputs["target_logit"].sum()).backward()
    unused = ("word_embeddings",)  # token ids are never used: the input is inputs_embeds
    # the key bias adds the same amount to every score of a query, which softmax ignores
    zero_by_design = ("attention.self.key.bias",)
    checked = set()
    for name, parameter in model.named_parameters():
        if any(part in name for part in unused):
            continue
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        if not any(part in name for part in zero_by_design):
            assert parameter.grad.abs().sum() > 0, name
        checked.add(name.split(".")[0])
    assert {"cls_token", "encoder", "bert", "gesture_head", "target_head", "demographics_encoder"} <= checked


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_outputs_do_not_depend_on_padding_or_the_rest_of_the_batch(attn_implementation):
    model = make_model(bert={"attn_implementation": attn_implementation}).eval()
    lengths = [37, 12, 50]
    features, mask, demographics = random_batch(lengths, max_len=50)
    with torch.no_grad():
        together = model(features, mask, demographics)["gesture_logits"]
        for i, length in enumerate(lengths):
            alone = model(features[i : i + 1, :length], mask[i : i + 1, :length], demographics[i : i + 1])
            padded = torch.cat([features[i : i + 1, :length], torch.zeros(1, 64 - length, N_FEATURES)], dim=1)
            padded_mask = torch.arange(64)[None] < length
            more = model(padded, padded_mask, demographics[i : i + 1])
            assert torch.allclose(alone["gesture_logits"][0], together[i], atol=1e-5)
            assert torch.allclose(more["gesture_logits"][0], together[i], atol=1e-5)


def test_values_at_padded_steps_change_nothing():
    model = make_model().eval()
    features, mask, demographics = random_batch([25, 40], max_len=48)
    garbage = features.clone()
    garbage[~mask] = 1e4
    with torch.no_grad():
        clean = model(features, mask, demographics)
        dirty = model(garbage, mask, demographics)
    assert torch.allclose(clean["gesture_logits"], dirty["gesture_logits"], atol=1e-5)
    assert torch.allclose(clean["target_logit"], dirty["target_logit"], atol=1e-5)


def test_sdpa_and_eager_attention_agree():
    sdpa = make_model().eval()
    eager = make_model(bert={"attn_implementation": "eager"}).eval()
    eager.load_state_dict(sdpa.state_dict())
    features, mask, demographics = random_batch([30, 18])
    with torch.no_grad():
        assert torch.allclose(
            sdpa(features, mask, demographics)["gesture_logits"],
            eager(features, mask, demographics)["gesture_logits"],
            atol=1e-5,
        )
        _, bert_mask, attentions = eager.encode(features, mask, output_attentions=True)
    # CLS attention never falls on padded steps
    cls_row = attentions[-1][:, :, 0, :]  # (B, heads, 1 + T)
    assert torch.all(cls_row[~bert_mask[:, None, :].expand_as(cls_row)] == 0)


def test_packed_and_padded_squeezeformer_give_the_same_training_step():
    """model.pack_padded_steps only changes how much work padding costs: same logits and
    gradients (dropout off, so that both runs are deterministic)."""
    no_dropout = {"dropout": 0.0, "attention_dropout": 0.0}
    bert = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    features, mask, demographics = random_batch([30, 18, 5])
    results = []
    for packed in (True, False):
        model = make_model(bert=bert, pack_padded_steps=packed, head_dropout=0.0, **no_dropout).train()
        logits = model(features, mask, demographics)["gesture_logits"]
        logits.logsumexp(-1).sum().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-4, rtol=1e-4, msg=name)


def test_works_without_demographics_and_on_imu_only_input():
    features, mask, demographics = random_batch([20, 31])
    without = make_model(use_demographics=False).eval()
    assert without.demographics_encoder is None
    assert without(features, mask)["gesture_logits"].shape == (2, NUM_GESTURES)
    model = make_model().eval()
    with torch.no_grad():
        unknown = model(features, mask, None)["gesture_logits"]
        all_nan = model(features, mask, torch.full_like(demographics, float("nan")))["gesture_logits"]
        imu_only = features.clone()
        imu_only[:, :, 6:] = 0.0  # thermopile and ToF features of an IMU-only sequence
        assert torch.isfinite(model(imu_only, mask, demographics)["gesture_logits"]).all()
    assert torch.allclose(unknown, all_nan)


def test_configuration_errors_are_clear():
    with pytest.raises(model_module.ModelConfigError, match=r"divisible by model\.bert\.num_heads"):
        make_model(bert={"hidden_size": 30, "num_heads": 4})
    with pytest.raises(model_module.ModelConfigError, match=r"max_position_embeddings \(40\) must cover"):
        make_model(max_len=64, bert={"max_position_embeddings": 40})
    with pytest.raises(model_module.ModelConfigError, match="attn_implementation"):
        make_model(bert={"attn_implementation": "flash"})


def test_state_dict_round_trip_gives_identical_outputs(tmp_path):
    model = make_model().eval()
    save_atomically({"model": model.state_dict()}, tmp_path / "m.pt")
    torch.manual_seed(123)  # a differently initialised model, then the saved weights
    fresh = model_module.GestureClassifier(N_FEATURES, model_config(), 64).eval()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True)["model"])
    features, mask, demographics = random_batch([22, 40])
    with torch.no_grad():
        assert torch.equal(
            model(features, mask, demographics)["gesture_logits"],
            fresh(features, mask, demographics)["gesture_logits"],
        )


def test_init_from_loads_matching_tensors_and_reports_the_rest(tmp_path):
    source = make_model()
    state = {
        k: v for k, v in source.state_dict().items() if not k.startswith(("gesture_head", "target_head"))
    }
    state["bert_projection.weight"] = torch.zeros(3, 3)  # not in the target model: unused
    save_atomically({"model": state}, tmp_path / "pretrained.pt")
    torch.manual_seed(7)
    target = model_module.GestureClassifier(N_FEATURES, model_config(), 64)
    report = load_matching_weights(target, tmp_path / "pretrained.pt")
    assert torch.equal(
        target.bert.encoder.layer[0].attention.self.query.weight,
        source.bert.encoder.layer[0].attention.self.query.weight,
    )
    assert torch.equal(target.cls_token, source.cls_token)
    assert any(k.startswith("gesture_head") for k in report["new"])
    assert report["unused"] == ["bert_projection.weight"] and not report["mismatched"]
    assert not torch.equal(target.gesture_head[0].weight, source.gesture_head[0].weight)


def test_training_run_initialised_from_a_checkpoint(toy_data, tmp_path):
    """exp018's train.py end to end on toy data, with model.init_from naming what was loaded."""
    overrides = [f"model.bert.{k}={v}" for k, v in TINY_BERT.items()]
    first = training_config(
        EXP, toy_data, tmp_path, TINY, "run_name=a", "trainer.epochs=1", "data.folds=[0]", *overrides
    )
    train_module.run_training(first)
    checkpoint = tmp_path / EXP / "a" / "fold0" / "best.pt"
    second = training_config(
        EXP,
        toy_data,
        tmp_path,
        TINY,
        "run_name=b",
        "trainer.epochs=1",
        "data.folds=[0]",
        f"model.init_from={checkpoint}",
        *overrides,
    )
    metrics = train_module.run_training(second)
    assert 0.0 <= metrics["overall"]["score"] <= 1.0
    log = (tmp_path / EXP / "b" / "train.log").read_text()
    assert f"initialised from {checkpoint}" in log and " 0 new " in log
    for name in ("oof.parquet", "metrics.json", "curves.png", "fold0/best.pt"):
        assert (tmp_path / EXP / "b" / name).is_file()


def test_bert_attends_to_the_cls_position():
    """The mask given to BERT has the CLS position as a real key: every query (the CLS row and each
    real step) gives it a positive weight. Fails if the CLS position is masked out."""
    model = make_model(bert={"attn_implementation": "eager"}).eval()
    features, mask, _ = random_batch([30, 18, 5])
    with torch.no_grad():
        _, bert_mask, attentions = model.encode(features, mask, output_attentions=True)
    assert bert_mask[:, 0].all()
    for layer in attentions:  # (B, heads, 1 + T, 1 + T)
        to_cls = layer[:, :, :, 0]  # every query's weight on the CLS key
        real_queries = bert_mask[:, None, :].expand_as(to_cls)
        assert (to_cls[real_queries] > 0).all()


def test_the_heads_read_the_cls_output():
    """The pooled vector is BERT's output at position 0 (the CLS token), not at a step."""
    model = make_model().eval()
    features, mask, demographics = random_batch([30, 18, 5])
    seen = {}
    model.gesture_head.register_forward_hook(
        lambda module, inputs, output: seen.setdefault("input", inputs[0])
    )
    model.target_head.register_forward_hook(
        lambda module, inputs, output: seen.setdefault("target", inputs[0])
    )
    with torch.no_grad():
        model(features, mask, demographics)
        hidden, _, _ = model.encode(features, mask)
    width = hidden.shape[-1]
    assert torch.equal(seen["input"][:, :width], hidden[:, 0])
    assert torch.equal(seen["target"][:, :width], hidden[:, 0])
    assert not torch.allclose(hidden[:, 0], hidden[:, 1])  # the test can tell the two apart
