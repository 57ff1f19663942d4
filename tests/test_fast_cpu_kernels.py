"""The CPU fast paths (cheap dropout mask, attention math, depthwise weight gradient) against the
native operations they replace, and the switch that puts them into a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from transformers import BertModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from codes.models.bert_config import build_bert, build_squeezeformer
from codes.models.cpu_fast_paths import bert_attention, cpu_fast_paths_enabled, enable_cpu_fast_paths
from codes.models.cpu_fast_paths.attention import CheapDropoutSelfAttention, attention_with_dropout
from codes.models.cpu_fast_paths.depthwise_conv import FastWeightGradDepthwiseConv1d
from codes.models.cpu_fast_paths.dropout import CheapDropout, dropout
from codes.models.masking import masked_mean, to_attention_mask
from codes.models.squeezeformer import MaskedDepthwiseConv1d, MultiHeadSelfAttention, SqueezeformerEncoder


def test_dropout_drops_at_rate_p_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(400_000)
    for p in (0.1, 0.3, 0.5):
        y = dropout(x, p)
        dropped = (y == 0).float().mean().item()
        assert dropped == pytest.approx(p, abs=0.005)
        assert y.mean().item() == pytest.approx(1.0, abs=0.01)
        kept = y[y != 0]
        assert torch.allclose(kept, torch.full_like(kept, kept[0].item()))  # one scale for all


def test_dropout_is_identity_in_eval_and_at_p0_and_rejects_bad_p():
    x = torch.randn(10, 7)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout(x, 1.0)


def test_dropout_is_repeatable_with_the_seed_and_its_gradient_is_the_same_mask():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.25)
    torch.manual_seed(3)
    assert torch.equal(dropout(x.detach(), 0.25), y.detach())
    y.backward(torch.ones_like(y))
    scale_mask = y.detach() / x.detach()  # 0 or 1 / (1 - p)
    assert torch.allclose(x.grad, scale_mask)


# the smallest drop probability of the cheap mask (1/65536): with these seeds nothing is dropped,
# so the dropout attention path must equal SDPA up to the rescaling 65536/65535
TINY_P = 1 / 65536


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("queries", [11, 1])
def test_attention_with_dropout_equals_the_plain_composition_with_the_same_mask(queries, additive):
    """The fast path (float32) against the plain softmax -> dropout -> matmul in float64, fed
    the same random bits: outputs and all three input gradients."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, queries, 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(3, 4, 11, 8, generator=generator, requires_grad=True) for _ in range(2))
    attend = (torch.arange(11)[None] < torch.tensor([11, 6, 1])[:, None])[:, None, None, :]
    if additive:  # the same mask as a 0 / -inf bias
        attend = torch.where(attend, 0.0, float("-inf"))
    grad = torch.randn(3, 4, queries, 8, generator=generator)
    torch.manual_seed(7)
    fast = attention_with_dropout(q, k, v, attend, 0.3, scale=0.4)
    fast.backward(grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    torch.manual_seed(7)
    plain = attention_with_dropout(q64, k64, v64, attend, 0.3, scale=0.4)  # float64: the plain path
    plain.backward(grad.double())
    assert (plain == 0).sum() < plain.numel()  # something was kept
    torch.testing.assert_close(fast.double(), plain, atol=1e-5, rtol=1e-5)
    for ours, reference in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), reference.grad, atol=1e-5, rtol=1e-5)
    # padded keys receive no gradient through the scores, only their values are never read
    assert torch.equal(k.grad[2, :, 1:], torch.zeros_like(k.grad[2, :, 1:]))
    assert torch.equal(v.grad[2, :, 1:], torch.zeros_like(v.grad[2, :, 1:]))


def test_attention_with_dropout_drops_at_rate_p():
    torch.manual_seed(0)
    q = torch.zeros(2, 4, 64, 8)  # uniform attention: output = mean of the kept values / (1 - p)
    v = torch.ones(2, 4, 64, 8)
    out = attention_with_dropout(q, q, v, None, 0.25)
    # each output is (1 / (1 - p)) * (kept / 64); over 512 rows its mean is 1 within sampling noise
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    assert out.std().item() == pytest.approx((0.25 / 0.75 / 64) ** 0.5, rel=0.15)


def test_squeezeformer_attention_dropout_path_equals_sdpa():
    torch.manual_seed(0)
    attention = MultiHeadSelfAttention(32, 4, attention_dropout=TINY_P, dropout=0.0).train()
    attention = enable_cpu_fast_paths(attention)
    assert type(attention) is CheapDropoutSelfAttention
    x = torch.randn(3, 11, 32)
    mask = torch.arange(11)[None] < torch.tensor([11, 6, 1])[:, None]
    torch.manual_seed(1)
    dropout_path = attention(x, mask)
    attention.attention_dropout = 0.0  # SDPA path
    reference = attention(x, mask)
    torch.testing.assert_close(dropout_path[mask], reference[mask], atol=1e-4, rtol=1e-4)


def test_bert_cpu_dropout_attention_equals_library_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    keys = torch.arange(9)[None] < torch.tensor([9, 4])[:, None]
    bool_mask = keys[:, None, None, :].expand(2, 1, 9, 9)
    module = nn.Module()
    module.is_causal = False
    for mask in (bool_mask, torch.where(bool_mask, 0.0, float("-inf")), None):
        torch.manual_seed(1)
        ours, _ = bert_attention.sdpa_with_cheap_cpu_dropout(
            module, q, k, v, mask, dropout=TINY_P, scaling=0.5
        )
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.5)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", [1, 3, 7, 31])
def test_depthwise_fast_weight_gradient_matches_the_native_one(kernel):
    torch.manual_seed(kernel)
    conv = enable_cpu_fast_paths(MaskedDepthwiseConv1d(24, kernel))
    assert type(conv) is FastWeightGradDepthwiseConv1d
    x = torch.randn(4, 37, 24, requires_grad=True)
    mask = torch.arange(37)[None] < torch.tensor([37, 20, 3, 1])[:, None]
    grad = torch.randn(4, 37, 24)
    y = conv(x, mask)  # the fast path (float32, CPU, training)
    assert y.grad_fn.name().endswith("DepthwiseConvFastWeightGradBackward")
    y.backward(grad)
    # native reference in float64 (the fast path is float32 only)
    x64 = x.detach().double().requires_grad_()
    weight64 = conv.weight.detach().double().requires_grad_()
    image = torch.where(mask[..., None], x64, 0.0).transpose(1, 2).unsqueeze(2)
    out = F.conv2d(image, weight64.unsqueeze(2), padding=(0, kernel // 2), groups=24)
    out.squeeze(2).transpose(1, 2).backward(grad.double())
    torch.testing.assert_close(conv.weight.grad.double(), weight64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the switch: enable_cpu_fast_paths on a Squeezeformer + BERT model with a classification head

MAX_LEN = 24
D = 16


def stack_config(rate: float, attn_implementation: str = "sdpa"):
    """A tiny ``model`` section (exp018's and NoiseBERT's fields) with every dropout at ``rate``."""
    return OmegaConf.create(
        {
            "d_model": D,
            "num_blocks": 4,
            "num_heads": 4,
            "ff_dim": 32,
            "conv_kernel": 5,
            "conv_expansion": 2,
            "dropout": rate,
            "attention_dropout": rate,
            "time_reduction": True,
            "positional_encoding": "sinusoidal",
            "pack_padded_steps": True,
            "bert": {
                "hidden_size": None,
                "num_layers": 2,
                "num_heads": 4,
                "intermediate_size": None,
                "hidden_dropout": rate,
                "attention_dropout": rate,
                "attn_implementation": attn_implementation,
                "max_position_embeddings": None,
                "gradient_checkpointing": False,
            },
        }
    )


class TinyClassifier(nn.Module):
    """exp018's shape: Squeezeformer -> BertModel -> a head whose dropout the switch leaves native."""

    def __init__(self, rate: float, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        cfg = stack_config(rate, attn_implementation)
        self.encoder = build_squeezeformer(cfg, MAX_LEN)
        self.bert = build_bert(cfg, MAX_LEN)
        self.head = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Dropout(rate), nn.Linear(D, 3))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x, mask = self.encoder(x, mask)  # (B, T, D)
        x = self.bert(inputs_embeds=x, attention_mask=to_attention_mask(mask)).last_hidden_state
        return self.head(masked_mean(x, mask))  # (B, D) -> (B, 3)


def tiny_classifier(rate: float, fast: bool, attn_implementation: str = "sdpa") -> TinyClassifier:
    torch.manual_seed(0)
    model = TinyClassifier(rate, attn_implementation)
    return enable_cpu_fast_paths(model) if fast else model


def tiny_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.arange(MAX_LEN)[None] < torch.tensor([24, 17, 5, 1])[:, None]
    x = torch.randn(4, MAX_LEN, D, generator=generator) * mask[..., None]
    return x, mask, torch.randint(0, 3, (4,), generator=generator)


def expected_fast_type(name: str, module: nn.Module) -> type[nn.Module]:
    """What the switch makes of a plain module: Squeezeformer and BERT dropouts, attention and
    depthwise convolutions; nothing else (the head's dropout stays ``nn.Dropout``)."""
    if type(module) is nn.Dropout and name.split(".")[0] in ("encoder", "bert"):
        return CheapDropout
    return {
        MultiHeadSelfAttention: CheapDropoutSelfAttention,
        MaskedDepthwiseConv1d: FastWeightGradDepthwiseConv1d,
    }.get(type(module), type(module))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_switch_swaps_the_fast_modules_in_place_and_only_those(attn_implementation):
    model = tiny_classifier(0.1, fast=False, attn_implementation=attn_implementation)
    assert model.bert.config._attn_implementation == attn_implementation  # plain: the library's own
    assert not cpu_fast_paths_enabled(model)
    plain_types = {name: type(module) for name, module in model.named_modules()}
    expected = {name: expected_fast_type(name, module) for name, module in model.named_modules()}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    parameters = list(model.parameters())

    assert enable_cpu_fast_paths(model) is model
    fast_types = {name: type(module) for name, module in model.named_modules()}
    assert fast_types == expected
    swapped = {name for name in plain_types if fast_types[name] is not plain_types[name]}
    assert sum(t is CheapDropout for t in fast_types.values()) >= 20  # the encoder's and BERT's
    assert {name.split(".")[0] for name in swapped} == {"encoder", "bert"}
    assert fast_types["head.2"] is nn.Dropout
    cheap_entry = bert_attention.SDPA_CHEAP_CPU_DROPOUT if attn_implementation == "sdpa" else "eager"
    assert model.bert.config._attn_implementation == cheap_entry
    assert cpu_fast_paths_enabled(model)
    # same state: the same parameter objects, keys and values (checkpoints load either way)
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())

    enable_cpu_fast_paths(model)  # idempotent
    assert {name: type(module) for name, module in model.named_modules()} == fast_types
    assert model.bert.config._attn_implementation == cheap_entry


def test_switch_on_a_bare_encoder_and_a_bare_bert():
    torch.manual_seed(0)
    encoder = enable_cpu_fast_paths(SqueezeformerEncoder(d_model=D, num_blocks=3, num_heads=2, ff_dim=32))
    assert not any(type(m) is nn.Dropout for m in encoder.modules())
    bert = enable_cpu_fast_paths(build_bert(stack_config(0.1), MAX_LEN))
    assert isinstance(bert, BertModel) and not any(type(m) is nn.Dropout for m in bert.modules())
    assert bert.config._attn_implementation == bert_attention.SDPA_CHEAP_CPU_DROPOUT


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_enabled_model_computes_exactly_the_plain_forward_in_eval(attn_implementation):
    plain = tiny_classifier(0.1, fast=False, attn_implementation=attn_implementation).eval()
    fast = tiny_classifier(0.1, fast=True, attn_implementation=attn_implementation).eval()
    x, mask, _ = tiny_batch()
    assert torch.equal(fast(x, mask), plain(x, mask))  # with autograd (the depthwise fast path runs)
    with torch.no_grad():
        assert torch.equal(fast(x, mask), plain(x, mask))


def train_steps(model: nn.Module, steps: int = 3) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for step in range(steps):
        x, mask, labels = tiny_batch(seed=step)
        loss = F.cross_entropy(model(x, mask), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def test_enabled_training_equals_the_plain_training_without_dropout():
    """Dropout rates 0 (the masks are the only random part): losses, gradients and weights of three
    AdamW steps agree up to float rounding (the depthwise weight gradient is summed differently)."""
    plain, fast = tiny_classifier(0.0, fast=False), tiny_classifier(0.0, fast=True)
    plain_losses, plain_grads = train_steps(plain)
    fast_losses, fast_grads = train_steps(fast)
    torch.testing.assert_close(torch.stack(fast_losses), torch.stack(plain_losses), atol=1e-6, rtol=1e-5)
    assert fast_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_enabled_training_is_repeatable_and_uses_its_own_masks():
    """With dropout on, an enabled model repeats itself under the seed, and its masks are the cheap
    ones (other random bits than the native dropout: a switch that did nothing would give the
    plain model's loss)."""
    losses = []
    for fast in (True, True, False):
        model = tiny_classifier(0.1, fast=fast)
        torch.manual_seed(5)
        step_losses, grads = train_steps(model, steps=2)
        assert all(torch.isfinite(g).all() for g in grads.values())
        losses.append(torch.stack(step_losses))
    assert torch.equal(losses[0], losses[1])
    assert not torch.equal(losses[0], losses[2])
