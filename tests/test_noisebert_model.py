"""NoiseBERT model, loss and pretraining run: the CLS row is exact, the penalty is safe and works,
the masked MSE looks at masked steps only, the weights initialise exp018, runs resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from codes.common.checkpoint import load_matching_weights, save_atomically
from codes.models.cpu_fast_paths import cpu_fast_paths_enabled, enable_cpu_fast_paths
from codes.noisebert import config as noisebert_config
from codes.noisebert.loss import (
    attention_penalty,
    clean_summary,
    cls_summary_loss,
    masked_mse,
    noise_region,
    noisy_attention_mass,
)
from codes.noisebert.model import NoiseBERT
from codes.noisebert.pretrain import TrainingInterrupted, pretrain

TINY = {"d_model": 32, "num_blocks": 3, "num_heads": 4, "ff_dim": 64, "conv_kernel": 5}
TINY_BERT = {"num_layers": 2, "num_heads": 4}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_model_cfg(**bert):
    cfg = OmegaConf.structured(noisebert_config.ModelConfig)
    cfg.merge_with(TINY)
    cfg.bert.merge_with({**TINY_BERT, **bert})
    return cfg


def batch_inputs(n_features: int = 6, length: int = 20, lengths=(20, 13, 4)):
    torch.manual_seed(0)
    features = torch.randn(len(lengths), length, n_features)
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    return features * mask[..., None], mask


@pytest.mark.parametrize("layers", ["last", "all"])
def test_cls_row_equals_the_eager_attention_row_with_padding(layers):
    features, mask = batch_inputs()
    torch.manual_seed(1)
    eager = NoiseBERT(6, tiny_model_cfg(attn_implementation="eager"), 20, layers).eval()
    fused = NoiseBERT(6, tiny_model_cfg(attn_implementation="sdpa"), 20, layers).eval()
    fused.load_state_dict(eager.state_dict())
    stored = {}
    original = eager.bert.forward

    def with_attentions(*args, **kwargs):
        out = original(*args, **{**kwargs, "output_attentions": True})
        stored["attentions"] = out.attentions
        return out

    eager.bert.forward = with_attentions
    with torch.no_grad():
        row_eager = eager(features, mask)["cls_attention"]
        row_fused = fused(features, mask)["cls_attention"]
    layer_ids = [1] if layers == "last" else [0, 1]
    reference = torch.stack([stored["attentions"][i][:, :, 0, 1:] for i in layer_ids], dim=1)
    assert row_eager.shape == (3, len(layer_ids), 4, 20)
    torch.testing.assert_close(row_eager, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(row_fused, reference, atol=1e-5, rtol=0)
    with torch.no_grad():  # the slow reference path the benchmark compares against
        from_maps = eager(features, mask, from_output_attentions=True)["cls_attention"]
    torch.testing.assert_close(from_maps, reference, atol=1e-6, rtol=0)
    assert torch.all(row_fused[~mask[:, None, None, :].expand_as(row_fused)] == 0)  # padded keys


def test_cpu_fast_paths_keep_the_outputs_and_the_hooked_cls_row():
    """The switch pretraining turns on for CPU: the same reconstruction and CLS row in eval
    (exactly), and the same training gradients without dropout (up to float rounding)."""
    features, mask = batch_inputs()
    masked = torch.zeros_like(mask)
    masked[:, 2:5] = True
    models = {}
    for fast in (False, True):
        cfg = tiny_model_cfg(hidden_dropout=0.0, attention_dropout=0.0)
        cfg.dropout = cfg.attention_dropout = 0.0  # the Squeezeformer's too
        torch.manual_seed(1)
        model = NoiseBERT(6, cfg, 20, "all")
        models[fast] = enable_cpu_fast_paths(model) if fast else model
    assert cpu_fast_paths_enabled(models[True]) and not cpu_fast_paths_enabled(models[False])
    with torch.no_grad():
        plain, fast = (models[f].eval()(features, mask, masked) for f in (False, True))
    assert torch.equal(fast["reconstruction"], plain["reconstruction"])
    assert torch.equal(fast["cls_attention"], plain["cls_attention"])
    grads = {}
    for f, model in models.items():
        model.train()
        out = model(features, mask, masked)
        (masked_mse(out["reconstruction"], features, masked) + out["cls_attention"].mean()).backward()
        grads[f] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_masked_and_padded_inputs_have_no_influence():
    features, mask = batch_inputs()
    masked = torch.zeros_like(mask)
    masked[:, 2:5] = True
    model = NoiseBERT(6, tiny_model_cfg(), 20).eval()
    changed = features.clone()
    changed[masked] = 100.0  # values at masked steps are replaced by the MASK embedding
    changed[~mask] = -50.0  # padded steps are never read
    with torch.no_grad():
        a = model(features, mask, masked)
        b = model(changed, mask, masked)
    torch.testing.assert_close(a["reconstruction"][mask], b["reconstruction"][mask])
    torch.testing.assert_close(a["cls_attention"], b["cls_attention"])


def test_masked_mse_ignores_unmasked_steps_and_matches_a_hand_computed_value():
    target = torch.zeros(2, 4, 3)
    prediction = torch.zeros(2, 4, 3)
    masked = torch.tensor([[True, False, False, False], [False, False, True, False]])
    prediction[0, 0] = torch.tensor([1.0, 2.0, 3.0])  # squared errors 1 + 4 + 9
    prediction[1, 2] = torch.tensor([0.0, 0.0, 2.0])  # 4
    expected = (1 + 4 + 9 + 4) / (2 * 3)
    assert masked_mse(prediction, target, masked).item() == pytest.approx(expected)
    prediction[~masked] = 1000.0
    assert masked_mse(prediction, target, masked).item() == pytest.approx(expected)
    assert masked_mse(prediction, target, torch.zeros_like(masked)).item() == 0.0


def test_masked_mse_counts_the_masked_values_exactly_for_a_bf16_prediction():
    """48,720 masked values: a count summed in bf16 rounds to 48,640 (the mean 0.16% too high);
    the loss counts in integers, so a bf16 prediction gives the float64 mean of its values."""
    generator = torch.Generator().manual_seed(0)
    masked = torch.zeros(8, 400, dtype=torch.bool)
    masked.view(-1)[:2564] = True  # 2,564 steps x 19 features = 48,716 values
    prediction = torch.randn(8, 400, 19, generator=generator).to(torch.bfloat16)
    target = torch.randn(8, 400, 19, generator=generator)
    diff = (prediction.double() - target.double()).square()[masked]
    expected = diff.sum() / (2564 * 19)
    assert masked_mse(prediction, target, masked).item() == pytest.approx(expected.item(), rel=1e-6)


def test_penalty_is_zero_without_noise_and_finite_for_full_mass():
    attention = torch.softmax(torch.randn(3, 2, 4, 10, requires_grad=True), dim=-1)
    no_noise = torch.zeros(3, 10, dtype=torch.bool)
    for form in ("mass", "log"):
        penalty = attention_penalty(attention, no_noise, form)
        assert penalty.item() == 0.0
        (grad,) = torch.autograd.grad(penalty, attention, retain_graph=True)
        assert torch.all(grad == 0)
    everything = torch.ones(3, 10, dtype=torch.bool)
    assert noisy_attention_mass(attention, everything).tolist() == pytest.approx([1.0, 1.0, 1.0])
    log_penalty = attention_penalty(attention, everything, "log")
    assert torch.isfinite(log_penalty) and log_penalty.item() == pytest.approx(
        -torch.log(torch.tensor(1e-4)).item()
    )


def test_penalty_averages_only_the_samples_with_noise_and_leaves_out_the_cls_key():
    attention = torch.zeros(2, 1, 1, 4)
    attention[0, 0, 0] = torch.tensor([0.1, 0.3, 0.0, 0.0])  # the CLS key holds the other 0.6
    attention[1, 0, 0] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    region = torch.tensor([[True, False, False, False], [False, False, False, False]])
    assert noisy_attention_mass(attention, region)[0].item() == pytest.approx(0.25)  # 0.1 / 0.4
    assert attention_penalty(attention, region).item() == pytest.approx(0.25)  # sample 1 has no noise


def test_noise_region_expands_the_intervals_to_steps():
    batch = {
        "noisy": torch.tensor([[False, True, False, False, False, False]]),
        "noise_intervals": torch.tensor([[1.0, 0.0, 0.0]]),
        "interval_index": torch.tensor([[0, 0, 1, 1, -1, -1]]),
    }
    assert noise_region(batch, "steps").tolist() == [[False, True, False, False, False, False]]
    assert noise_region(batch, "intervals").tolist() == [[True, True, False, False, False, False]]
    with pytest.raises(ValueError, match="region"):
        noise_region(batch, "everywhere")


def test_a_few_steps_on_the_penalty_lower_the_mass_on_noisy_steps():
    features, mask = batch_inputs(lengths=(20, 16, 12))
    region = torch.zeros_like(mask)
    region[:, 3:9] = True
    torch.manual_seed(0)
    cfg = tiny_model_cfg(hidden_dropout=0.0, attention_dropout=0.0)
    cfg.dropout = cfg.attention_dropout = 0.0  # the Squeezeformer's too: plain optimisation of the penalty
    model = NoiseBERT(6, cfg, 20).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def mass() -> float:
        with torch.no_grad():
            return noisy_attention_mass(model.eval()(features, mask)["cls_attention"], region).mean().item()

    before = mass()
    for _ in range(15):
        model.train()
        penalty = attention_penalty(model(features, mask)["cls_attention"], region)
        optimizer.zero_grad()
        penalty.backward()
        optimizer.step()
    assert mass() < 0.5 * before


def test_noisebert_weights_initialise_exp018(tmp_path):
    from codes.exp.exp018 import config as exp018_config
    from codes.exp.exp018.model import GestureClassifier

    pretrained = NoiseBERT(6, tiny_model_cfg(), 20)
    save_atomically({"model": pretrained.state_dict()}, tmp_path / "best.pt")
    exp_cfg = OmegaConf.structured(exp018_config.ModelConfig)
    exp_cfg.merge_with(TINY)
    exp_cfg.bert.merge_with(TINY_BERT)
    classifier = GestureClassifier(6, exp_cfg, 20)
    report = load_matching_weights(classifier, tmp_path / "best.pt")
    assert not report["mismatched"]
    assert sorted(report["unused"]) == sorted(
        ["mask_embedding", "reconstruction_head.weight", "reconstruction_head.bias"]
    )
    assert all(k.startswith(("gesture_head", "target_head", "demographics_encoder")) for k in report["new"])
    state = classifier.state_dict()
    for key in report["loaded"]:
        assert torch.equal(state[key], pretrained.state_dict()[key])


def pretrain_config(data_dir: Path, output_dir: Path, *overrides: str):
    noisebert_config.register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(
            config_name="noisebert",
            overrides=[
                "variant=quick",
                "machine=cpu",
                "data=competition",
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={output_dir}",
                "data.include_test=false",
                "data.valid_fraction=0.34",
                "data.max_len=32",
                "trainer.batch_size=32",
                *[f"model.{k}={v}" for k, v in TINY.items()],
                *[f"model.bert.{k}={v}" for k, v in TINY_BERT.items()],
                *overrides,
            ],
        )


def test_pretraining_run_writes_its_outputs_and_resumes_to_the_same_history(toy_data, tmp_path):
    straight = pretrain(pretrain_config(toy_data, tmp_path, "trainer.epochs=2", "run_name=straight"))
    run = tmp_path / "noisebert" / "straight"
    for name in ("config.yaml", "normalizer.json", "best.pt", "last.pt", "metrics.json", "loss_curves.png",
                 "cls_attention.png"):  # fmt: skip
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    row = metrics["history"][-1]
    for key in ("train_loss", "train_masked_mse", "train_regularizer", "valid_loss", "valid_masked_mse",
                "valid_regularizer", "valid_cls_mass_on_noisy"):  # fmt: skip
        assert key in row and row[key] == row[key]  # present, not NaN
    assert metrics["valid_interpolation_mse"] > 0

    with pytest.raises(TrainingInterrupted):
        pretrain(pretrain_config(toy_data, tmp_path, "trainer.epochs=2", "run_name=resumed",
                                 "trainer.interrupt_after_epochs=1"))  # fmt: skip
    with pytest.raises(FileExistsError, match=r"trainer\.resume=true"):
        pretrain(pretrain_config(toy_data, tmp_path, "trainer.epochs=2", "run_name=resumed"))
    resumed = pretrain(pretrain_config(toy_data, tmp_path, "trainer.epochs=2", "run_name=resumed",
                                       "trainer.resume=true"))  # fmt: skip
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert a["valid_masked_mse"] == pytest.approx(b["valid_masked_mse"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_the_cls_row_is_float32_under_bf16_autocast():
    """Under bf16 autocast the CLS row is computed in float32 from the captured query and key: it
    matches the same row without autocast to 1e-5 (a bf16 matmul is ~1e-3 off)."""
    model = NoiseBERT(6, tiny_model_cfg(), max_len=64).eval()
    generator = torch.Generator().manual_seed(0)
    query, key = (
        torch.randn(3, 21, 32, generator=generator) * 3,
        torch.randn(3, 21, 32, generator=generator) * 3,
    )
    mask = torch.arange(21)[None] < torch.tensor([21, 14, 5])[:, None]
    reference = model.cls_attention_row(query, key, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        row = model.cls_attention_row(query, key, mask)
    assert row.dtype == torch.float32
    torch.testing.assert_close(row, reference, atol=1e-5, rtol=0)
    assert torch.equal(row[1, :, 14:], torch.zeros_like(row[1, :, 14:]))  # padded keys get nothing


def test_the_cls_objective_reaches_the_cls_query_of_every_penalised_layer():
    """Reconstruction alone gives the last layer's CLS query no gradient (its CLS output is
    unused); the CLS objective reaches the CLS query of every layer the penalty looks at."""
    features, mask = batch_inputs()
    torch.manual_seed(1)
    model = NoiseBERT(6, tiny_model_cfg(), 20, "all", cls_summary=True).eval()
    queries = {}

    def keep(index):
        def hook(module, inputs, output):
            output.retain_grad()
            queries[index] = output

        return hook

    for index in model.attention_layer_indices:
        model.bert.encoder.layer[index].attention.self.query.register_forward_hook(keep(index))
    masked = torch.zeros_like(mask)
    masked[:, 2:6] = True
    out = model(features, mask, masked)
    masked_mse(out["reconstruction"], features, masked).backward(retain_graph=True)
    assert torch.equal(queries[len(queries) - 1].grad[:, 0], torch.zeros_like(queries[0].grad[:, 0]))
    for query in queries.values():
        query.grad = None
    cls_summary_loss(out["cls_summary"], features, mask).backward()
    assert len(queries) == 2
    for index, query in queries.items():
        assert query.grad[:, 0].abs().sum() > 0, f"layer {index}: no gradient at the CLS query"
    assert clean_summary(features, mask).shape == (3, 12)


def test_clean_summary_is_the_mean_and_std_of_the_real_steps():
    clean = torch.zeros(2, 5, 2)
    clean[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 100.0, 100.0])  # the last two are padding
    clean[1, :, 1] = torch.tensor([4.0, 4.0, 4.0, 4.0, 4.0])
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    summary = clean_summary(clean, mask)
    expected = torch.tensor([[2.0, 0.0, (2 / 3) ** 0.5, 0.0], [0.0, 4.0, 0.0, 0.0]])
    torch.testing.assert_close(summary, expected)


def test_the_penalty_lowers_the_cls_mass_on_noisy_steps_in_a_short_run(toy_data, tmp_path):
    """The same short pretraining with lambda = 0 and lambda = 10 (CLS objective on): the penalty
    moves the CLS attention away from the noisy steps, and that costs CLS-objective loss (the
    trade-off the objective exists for; 0.80 -> 0.45 mass, 0.036 -> 0.074 loss when written)."""
    masses, cls_losses = {}, {}
    for weight in (0, 10):
        cfg = pretrain_config(toy_data, tmp_path, "trainer.epochs=30", "trainer.lr=1e-2", f"run_name=lambda{weight}",
                              f"regularizer.weight={weight}", "regularizer.layers=all")  # fmt: skip
        metrics = pretrain(cfg)
        masses[weight] = metrics["history"][-1]["valid_cls_mass_on_noisy"]
        cls_losses[weight] = metrics["history"][-1]["valid_cls_objective"]
    assert masses[10] < masses[0] - 0.1, masses
    assert cls_losses[10] > cls_losses[0] > 0, cls_losses


def test_strict_pretraining_leaves_every_sequence_of_the_fold_out(toy_data, tmp_path):
    """``data.exclude_fold=k``: no train or test sequence of fold k's subjects (the experiments'
    folds) is pretraining or validation data; every other subject's sequences stay."""
    from codes.common.features import FeatureSettings
    from codes.common.folds import assign_folds
    from codes.common.sequences import load_sequence_table
    from codes.noisebert.pretrain import without_fold

    train = load_sequence_table(toy_data, "train", FeatureSettings())
    test = train.subset(np.arange(0, train.n_sequences, 2))  # a stand-in test file: every subject
    folds = assign_folds(train.gestures, train.subjects, 3, 42)
    held_out = set(train.subjects[folds == 1])
    cfg = OmegaConf.create({"exclude_fold": 1, "n_folds": 3, "fold_seed": 42})
    kept_train, kept_test = without_fold(train, test, toy_data, cfg)
    assert held_out and not held_out & set(kept_train.subjects) and not held_out & set(kept_test.subjects)
    assert kept_train.n_sequences == int((folds != 1).sum())
    assert set(kept_train.subjects) == set(train.subjects) - held_out
    assert set(kept_test.subjects) == set(test.subjects) - held_out
    with pytest.raises(ValueError, match="exclude_fold=5"):
        without_fold(
            train, test, toy_data, OmegaConf.create({"exclude_fold": 5, "n_folds": 3, "fold_seed": 42})
        )

    pretrain(pretrain_config(toy_data, tmp_path, "trainer.epochs=1", "run_name=strict", "data.exclude_fold=1",
                             "data.n_folds=3", "data.valid_fraction=0.5"))  # fmt: skip
    log = (tmp_path / "noisebert" / "strict" / "train.log").read_text()
    assert f"fold 1's {len(held_out)} subjects left out" in log


def test_init_from_takes_the_folds_own_checkpoint(tmp_path):
    """``{fold}`` in ``model.init_from`` becomes the fold: fold k loads pretraining k's tensors."""
    from codes.common.training import initialise_from

    for fold in (0, 1):
        torch.manual_seed(fold)
        save_atomically({"model": torch.nn.Linear(3, 2).state_dict()}, tmp_path / f"strict-fold{fold}.pt")
    for fold in (0, 1):
        model = torch.nn.Linear(3, 2)
        initialise_from(model, str(tmp_path / "strict-fold{fold}.pt"), fold=fold)
        torch.manual_seed(fold)
        assert torch.equal(model.weight, torch.nn.Linear(3, 2).weight)


def test_validation_over_cut_batches_gives_the_padded_losses(toy_data, tmp_path):
    """``data.pad_to_batch``: the pretraining loader cuts each batch to its longest sequence
    (``CutCollate``); a validation pass of the same model over cut batches gives the padded
    pass's losses and CLS mass."""
    from torch.utils.data import DataLoader

    from codes.common.batching import BatchCut
    from codes.common.distributed import DistributedContext
    from codes.noisebert.dataset import CutCollate, NoiseBERTDataset
    from codes.noisebert.pretrain import run_epoch

    cfg = pretrain_config(toy_data, tmp_path, "data.max_len=48", "data.pad_to_batch=true")
    assert BatchCut.from_config(cfg) == BatchCut(48)
    rng = np.random.default_rng(0)
    sequences = [rng.normal(size=(n, 6)).astype(np.float32) for n in (5, 30, 11, 48, 2, 19, 7, 1)]
    dataset = NoiseBERTDataset(sequences, max_len=48, seed=1, noise_channels=[0, 1, 2])
    torch.manual_seed(0)
    model = NoiseBERT(6, cfg.model, 48, cfg.regularizer.layers, cfg.cls_objective.weight > 0)
    context = DistributedContext(torch.device("cpu"))
    padded = run_epoch(model, DataLoader(dataset, batch_size=3), cfg, context)
    cut = run_epoch(
        model, DataLoader(dataset, batch_size=3, collate_fn=CutCollate(BatchCut(48))), cfg, context
    )
    assert padded.keys() == cut.keys()
    for key in padded:
        assert cut[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-6), key


def test_a_pretraining_run_with_cut_batches_completes(toy_data, tmp_path):
    metrics = pretrain(
        pretrain_config(toy_data, tmp_path, "trainer.epochs=1", "run_name=cut", "data.pad_to_batch=true")
    )
    row = metrics["history"][-1]
    assert all(np.isfinite(row[k]) for k in ("train_loss", "valid_loss", "valid_masked_mse"))
