"""The CPU fast paths (cheap dropout mask, attention math, depthwise weight gradient) against the
native operations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from codes.models import bert_attention, squeezeformer
from codes.models.dropout import Dropout, dropout, replace_dropout_modules
from codes.models.squeezeformer import MaskedDepthwiseConv1d, MultiHeadSelfAttention


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


def test_replace_dropout_modules_swaps_plain_dropouts_only():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.4), Dropout(0.1)))
    assert replace_dropout_modules(net) == 2
    ps = [(type(m), m.p) for m in net.modules() if isinstance(m, nn.Dropout)]
    assert ps == [(Dropout, 0.2), (Dropout, 0.4), (Dropout, 0.1)]


def _no_dropout(x, p, training=True):
    return x


def test_squeezeformer_attention_cpu_math_equals_sdpa(monkeypatch):
    torch.manual_seed(0)
    attention = MultiHeadSelfAttention(32, 4, attention_dropout=0.2, dropout=0.0).train()
    x = torch.randn(3, 11, 32)
    mask = torch.arange(11)[None] < torch.tensor([11, 6, 1])[:, None]
    monkeypatch.setattr(squeezeformer, "dropout", _no_dropout)  # the math path without its mask
    math_path = attention(x, mask)
    attention.attention_dropout = 0.0  # SDPA path
    reference = attention(x, mask)
    torch.testing.assert_close(math_path[mask], reference[mask], atol=1e-6, rtol=1e-5)


def test_bert_cpu_dropout_attention_equals_library_sdpa(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    keys = torch.arange(9)[None] < torch.tensor([9, 4])[:, None]
    bool_mask = keys[:, None, None, :].expand(2, 1, 9, 9)
    module = nn.Module()
    module.is_causal = False
    monkeypatch.setattr(bert_attention, "cheap_dropout", _no_dropout)
    for mask in (bool_mask, torch.where(bool_mask, 0.0, float("-inf")), None):
        ours, _ = bert_attention.sdpa_with_cheap_cpu_dropout(module, q, k, v, mask, dropout=0.3, scaling=0.5)
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.5)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", [1, 3, 7, 31])
def test_depthwise_fast_weight_gradient_matches_the_native_one(kernel):
    torch.manual_seed(kernel)
    conv = MaskedDepthwiseConv1d(24, kernel)
    x = torch.randn(4, 37, 24, requires_grad=True)
    mask = torch.arange(37)[None] < torch.tensor([37, 20, 3, 1])[:, None]
    grad = torch.randn(4, 37, 24)
    conv(x, mask).backward(grad)  # the fast path (float32, CPU, training)
    # native reference in float64 (the fast path is float32 only)
    x64 = x.detach().double().requires_grad_()
    weight64 = conv.weight.detach().double().requires_grad_()
    image = torch.where(mask[..., None], x64, 0.0).transpose(1, 2).unsqueeze(2)
    out = F.conv2d(image, weight64.unsqueeze(2), padding=(0, kernel // 2), groups=24)
    out.squeeze(2).transpose(1, 2).backward(grad.double())
    torch.testing.assert_close(conv.weight.grad.double(), weight64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
