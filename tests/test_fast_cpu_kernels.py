"""The CPU fast paths (cheap dropout mask, attention math, depthwise weight gradient) against the
native operations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from codes.models import bert_attention
from codes.models.attention_dropout import attention_with_dropout
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
