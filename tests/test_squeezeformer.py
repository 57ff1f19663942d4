"""Squeezeformer encoder and mask helpers: properties of masking, normalisation and the U-Net."""

import io
import math

import pytest
import torch
from torch import nn

from codes.models.cpu_fast_paths import enable_cpu_fast_paths
from codes.models.masking import (
    downsample_mask,
    lengths_to_mask,
    masked_max,
    masked_mean,
    sdpa_key_mask,
    to_attention_mask,
    to_key_padding_mask,
)
from codes.models.squeezeformer import (
    MaskedBatchNorm1d,
    MultiHeadSelfAttention,
    SinusoidalPositionalEncoding,
    SqueezeformerEncoder,
    TimeRecovery,
    TimeReduction,
)

D = 32
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run as fast on one intra-op thread, and stay fast when other jobs load the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_encoder(seed: int = 0, fast_paths: bool = False, **overrides) -> SqueezeformerEncoder:
    """A 4-block encoder (reduce after block 0, recover before block 3 by default); ``fast_paths``:
    with the CPU fast paths that training on CPU switches on."""
    torch.manual_seed(seed)
    settings = dict(
        d_model=D, num_blocks=4, num_heads=4, ff_dim=64, conv_kernel=7, dropout=0.0, attention_dropout=0.0
    )
    settings.update(overrides)
    encoder = SqueezeformerEncoder(**settings)
    return enable_cpu_fast_paths(encoder) if fast_paths else encoder


def warmed_up(encoder: SqueezeformerEncoder, seed: int = 1) -> SqueezeformerEncoder:
    """Move the BatchNorm running statistics away from (0, 1) with a few training passes."""
    generator = torch.Generator().manual_seed(seed)
    encoder.train()
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 24, D, generator=generator) * 2 + 0.5
            lengths = torch.randint(5, 25, (4,), generator=generator)
            encoder(x, lengths_to_mask(lengths, 24))
    return encoder.eval()


def random_batch(lengths: list[int], max_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max_len, D, generator=generator)
    return x, lengths_to_mask(torch.tensor(lengths), max_len)


# ---------------------------------------------------------------------------------------------
# mask helpers and pooling


def test_mask_conversions_agree():
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [False, True, False, True]])
    attention_mask = to_attention_mask(mask)
    assert attention_mask.dtype == torch.long
    assert attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]]
    assert torch.equal(to_key_padding_mask(mask), attention_mask == 0)
    key_mask = sdpa_key_mask(mask)
    assert key_mask.shape == (3, 1, 1, 4) and key_mask.dtype == torch.bool
    assert torch.equal(key_mask[:, 0, 0], attention_mask.bool())


def test_sdpa_key_mask_keeps_an_all_padding_sequence_finite():
    mask = torch.tensor([[True, False], [False, False]])
    assert sdpa_key_mask(mask)[1].all()  # documented rule: attend everywhere, output is ignored
    attention = MultiHeadSelfAttention(D, 4, attention_dropout=0.0, dropout=0.0)
    assert torch.isfinite(attention(torch.randn(2, 2, D), mask)).all()


def test_attention_matches_nn_multihead_attention_with_key_padding_mask():
    torch.manual_seed(0)
    ours = MultiHeadSelfAttention(D, 4, attention_dropout=0.0, dropout=0.0)
    reference = nn.MultiheadAttention(D, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.qkv.weight)
        reference.in_proj_bias.copy_(ours.qkv.bias)
        reference.out_proj.weight.copy_(ours.out.weight)
        reference.out_proj.bias.copy_(ours.out.bias)
    x, mask = random_batch([5, 9, 1], 9)
    expected, _ = reference(x, x, x, key_padding_mask=to_key_padding_mask(mask), need_weights=False)
    got = ours(x, mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=TOL, rtol=0)


def test_masked_pooling_equals_hand_computed_over_real_steps():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 3, generator=generator) * 1e6 - 1e30  # large and negative
    mask = torch.tensor(
        [
            [True] * 7,
            [True, True, True, False, False, False, False],
            [False, True, False, True, True, False, False],  # not right-padded
            [False] * 7,  # no real step: documented to pool to zeros
        ]
    )
    x[~mask] = torch.tensor([float("inf"), float("nan"), -float("inf")])  # garbage must never leak
    mean, maximum = masked_mean(x, mask), masked_max(x, mask)
    for i in range(3):
        real = x[i][mask[i]].double()
        torch.testing.assert_close(mean[i].double(), real.mean(0), rtol=1e-6, atol=0)
        assert torch.equal(maximum[i], x[i][mask[i]].amax(0))
    assert torch.equal(mean[3], torch.zeros(3)) and torch.equal(maximum[3], torch.zeros(3))


def test_masked_pooling_gradients_reach_only_real_steps():
    x = torch.randn(2, 5, 3, requires_grad=True)
    mask = lengths_to_mask(torch.tensor([3, 5]), 5)
    (masked_mean(x, mask).sum() + masked_max(x, mask).sum()).backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert (x.grad[mask] != 0).any()


def test_mask_is_checked():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="bool"):
        masked_mean(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match="shape"):
        masked_max(x, torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# MaskedBatchNorm1d


@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_batchnorm_equals_batchnorm_on_real_steps(momentum):
    torch.manual_seed(0)
    channels = 6
    ours = MaskedBatchNorm1d(channels, momentum=momentum)
    reference = nn.BatchNorm1d(channels, momentum=momentum)
    with torch.no_grad():
        for module in (ours, reference):
            module.weight.copy_(torch.linspace(0.5, 2.0, channels))
            module.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    for step, lengths in enumerate(([3, 9, 1], [9, 2, 5], [4, 4, 8])):
        x = torch.randn(3, 9, channels) * 3 + step
        mask = lengths_to_mask(torch.tensor(lengths), 9)
        x[~mask] = 1e4  # padding must not enter the statistics
        got = ours.train()(x, mask)
        expected = reference.train()(x[mask])  # (N_real, C)
        torch.testing.assert_close(got[mask], expected, atol=TOL, rtol=TOL)
        assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    torch.testing.assert_close(ours.running_mean, reference.running_mean, atol=TOL, rtol=TOL)
    torch.testing.assert_close(ours.running_var, reference.running_var, atol=TOL, rtol=TOL)
    assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked) == 3
    x = torch.randn(2, 4, channels)
    mask = lengths_to_mask(torch.tensor([4, 2]), 4)
    torch.testing.assert_close(ours.eval()(x, mask)[mask], reference.eval()(x[mask]), atol=TOL, rtol=TOL)
    assert ours.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_batchnorm_on_packed_rows_equals_the_masked_form(momentum):
    """mask=None (every row real, the fused kernel) = the masked form on the same real steps."""
    torch.manual_seed(0)
    packed, masked = MaskedBatchNorm1d(5, momentum=momentum), MaskedBatchNorm1d(5, momentum=momentum)
    for step in range(3):
        x = torch.randn(3, 8, 5) * 2 + step
        mask = lengths_to_mask(torch.tensor([8, 3, 5]), 8)
        rows = x[mask].requires_grad_(True)
        padded = x.clone().requires_grad_(True)
        got, expected = packed(rows, None), masked(padded, mask)
        torch.testing.assert_close(got, expected[mask], atol=TOL, rtol=TOL)
        (got * torch.arange(5.0)).sum().backward()
        (expected * torch.arange(5.0)).sum().backward()
        torch.testing.assert_close(rows.grad, padded.grad[mask], atol=TOL, rtol=TOL)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(packed, name), getattr(masked, name), atol=TOL, rtol=TOL)
    one_row = packed(torch.randn(1, 5), None)  # too few rows for the fused kernel: documented fallback
    assert torch.isfinite(one_row).all()


def test_masked_batchnorm_ignores_an_all_padding_batch():
    norm = MaskedBatchNorm1d(4).train()
    out = norm(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(norm.running_mean, torch.zeros(4)) and torch.equal(norm.running_var, torch.ones(4))


def test_masked_batchnorm_statistics_in_float32_under_autocast():
    norm = MaskedBatchNorm1d(4).train()
    x = (torch.randn(2, 5, 4) * 100 + 1000).bfloat16()
    mask = lengths_to_mask(torch.tensor([5, 3]), 5)
    out = norm(x, mask)
    assert out.dtype == torch.bfloat16 and norm.running_mean.dtype == torch.float32
    torch.testing.assert_close(norm.running_mean, 0.1 * x.float()[mask].mean(0), rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# the temporal U-Net


@pytest.mark.parametrize("max_len", [1, 2, 7, 8, 37])
def test_time_reduction_mask_downsampling(max_len):
    lengths = torch.arange(max_len + 1)
    mask = lengths_to_mask(lengths, max_len)
    reduced = downsample_mask(mask)
    assert reduced.shape == (max_len + 1, math.ceil(max_len / 2))
    expected = lengths_to_mask((lengths + 1) // 2, math.ceil(max_len / 2))  # ceil(len / 2) real steps
    assert torch.equal(reduced, expected)
    torch.manual_seed(0)
    module = TimeReduction(D)
    x, reduced_again = module(torch.randn(max_len + 1, max_len, D), mask)
    assert torch.equal(reduced_again, reduced)
    assert x.shape == (max_len + 1, math.ceil(max_len / 2), D)
    assert torch.equal(x[~reduced], torch.zeros_like(x[~reduced]))


@pytest.mark.parametrize("length", [7, 8])
def test_time_recovery_repeats_each_reduced_step_twice(length):
    torch.manual_seed(0)
    recovery = TimeRecovery(D)
    reduced = torch.randn(2, math.ceil(length / 2), D)
    skip = torch.randn(2, length, D)
    out = recovery(reduced, skip)
    assert out.shape == skip.shape
    for t in range(length):
        torch.testing.assert_close(out[:, t], skip[:, t] + recovery.linear(reduced[:, t // 2]))


@pytest.mark.parametrize(("reduce_after", "recover_before"), [(0, 2), (1, 3), (0, 4), (2, 4)])
def test_encoder_returns_the_input_mask_for_any_unet_placement(reduce_after, recover_before):
    encoder = small_encoder(reduce_after_block=reduce_after, recover_before_block=recover_before).eval()
    x, mask = random_batch([11, 4], 11)
    out, out_mask = encoder(x, mask)
    assert out.shape == x.shape and torch.equal(out_mask, mask)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


# ---------------------------------------------------------------------------------------------
# the encoder


@pytest.mark.parametrize("time_reduction", [True, False])
@pytest.mark.parametrize("max_len", [16, 17])
def test_forward_shapes(time_reduction, max_len):
    encoder = small_encoder(time_reduction=time_reduction)
    x, mask = random_batch([max_len, 9, 1], max_len)
    out, out_mask = encoder(x, mask)
    assert out.shape == (3, max_len, D) and out.dtype == torch.float32
    assert torch.equal(out_mask, mask)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("positional_encoding", ["sinusoidal", "learned"])
def test_every_parameter_gets_a_finite_nonzero_gradient(positional_encoding):
    encoder = small_encoder(positional_encoding=positional_encoding, max_len=32).train()
    x, mask = random_batch([17, 9, 12], 17)
    out, _ = encoder(x, mask)
    weights = torch.randn(D, generator=torch.Generator().manual_seed(5))
    (out[mask] @ weights).square().mean().backward()  # a loss on real steps only
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("time_reduction", [True, False])
@pytest.mark.parametrize("length", [37, 38])
def test_padding_invariance_and_batch_independence_in_eval(time_reduction, length, packed):
    encoder = warmed_up(small_encoder(time_reduction=time_reduction, pack_padded_steps=packed))
    generator = torch.Generator().manual_seed(3)
    sequence = torch.randn(length, D, generator=generator)
    with torch.no_grad():
        alone, _ = encoder(sequence[None], torch.ones(1, length, dtype=torch.bool))
        for max_len in (length, 40, 64):
            for companions in ([], [max_len, 5], [3, 29, max_len]):
                lengths = [*companions[:1], length, *companions[1:]]
                x, mask = random_batch(lengths, max_len, seed=max_len + len(companions))
                row = 1 if companions else 0
                x[row, :length] = sequence
                out, _ = encoder(x, mask)
                torch.testing.assert_close(out[row, :length], alone[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("fast_paths", [False, True])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("time_reduction", [True, False])
def test_values_at_padded_steps_change_nothing(training, time_reduction, packed, fast_paths):
    encoder = small_encoder(time_reduction=time_reduction, pack_padded_steps=packed, fast_paths=fast_paths)
    encoder = warmed_up(encoder).train(training)
    x, mask = random_batch([13, 20, 7], 20)
    n_padded = int((~mask).sum())
    garbage = x.clone()
    garbage[~mask] = torch.tensor([1e9, -1e9, float("nan"), float("inf")]).repeat(n_padded)[:n_padded, None]
    garbage.requires_grad_(True)
    clean_out, _ = encoder(x, mask)
    garbage_out, _ = encoder(garbage, mask)
    assert torch.equal(clean_out, garbage_out)
    garbage_out.sum().backward()
    assert torch.equal(garbage.grad[~mask], torch.zeros_like(garbage.grad[~mask]))


def test_training_statistics_are_the_same_with_garbage_padding():
    x, mask = random_batch([13, 20, 7], 20)
    garbage = x.clone()
    garbage[~mask] = 1e6
    runs = []
    for batch in (x, garbage):
        encoder = small_encoder(seed=4).train()
        out, _ = encoder(batch, mask)
        runs.append((out, [b.clone() for n, b in encoder.named_buffers() if "running" in n]))
    assert torch.equal(runs[0][0], runs[1][0])
    for clean, dirty in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(clean, dirty)


@pytest.mark.parametrize("fast_paths", [False, True])
@pytest.mark.parametrize("packed", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients_and_statistics(packed, fast_paths):
    x, mask = random_batch([13, 20, 7], 20)
    results = []
    for checkpointing in (False, True):
        encoder = small_encoder(
            seed=2, gradient_checkpointing=checkpointing, pack_padded_steps=packed, fast_paths=fast_paths
        ).train()
        out, _ = encoder(x, mask)
        out[mask].square().mean().backward()
        grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
        results.append((grads, {n: b.clone() for n, b in encoder.named_buffers()}))
    for name, grad in results[0][0].items():
        torch.testing.assert_close(results[1][0][name], grad, atol=TOL, rtol=TOL, msg=name)
    for name, buffer in results[0][1].items():
        assert torch.equal(results[1][1][name], buffer), name  # updated once per step, not twice


@pytest.mark.parametrize("fast_paths", [False, True])
@pytest.mark.parametrize("no_padding", [False, True])
@pytest.mark.parametrize("time_reduction", [True, False])
def test_packed_and_padded_computations_agree(time_reduction, no_padding, fast_paths):
    """Running per-step layers on the real steps only changes nothing but float rounding: outputs,
    gradients and BatchNorm statistics, in training and eval, including a mask with holes and a
    batch without padding (where packing is a reshape)."""
    x, mask = random_batch([13, 20, 7, 1], 20)
    mask[2, 3:5] = False  # padding inside a sequence: a real step whose reduced step is padding
    if no_padding:
        mask[:] = True
    results = []
    for packed in (True, False):
        encoder = small_encoder(
            seed=6, time_reduction=time_reduction, pack_padded_steps=packed, fast_paths=fast_paths
        ).train()
        train_out, _ = encoder(x, mask)
        train_out.square().sum().backward()
        eval_out, _ = encoder.eval()(x, mask)
        grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
        buffers = {n: b.clone() for n, b in encoder.named_buffers() if "running" in n}
        results.append((train_out, eval_out, grads, buffers))
    (packed_train, packed_eval, packed_grads, packed_buffers), (train, eval_, grads, buffers) = results
    torch.testing.assert_close(packed_train, train, atol=TOL, rtol=TOL)
    torch.testing.assert_close(packed_eval, eval_, atol=TOL, rtol=TOL)
    assert torch.equal(packed_eval[~mask], torch.zeros_like(packed_eval[~mask]))
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)
    for name, buffer in buffers.items():
        torch.testing.assert_close(packed_buffers[name], buffer, atol=TOL, rtol=TOL, msg=name)


def test_packed_encoder_handles_a_batch_without_real_steps():
    encoder = small_encoder().train()
    x, mask = random_batch([3, 0], 6)
    out, _ = encoder(x, mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    empty = torch.zeros(2, 6, dtype=torch.bool)
    out, _ = encoder(x, empty)
    assert torch.equal(out, torch.zeros_like(out))


def test_saved_and_reloaded_encoder_gives_the_same_outputs():
    encoder = warmed_up(small_encoder(positional_encoding="learned", max_len=32))
    buffer = io.BytesIO()
    torch.save(encoder.state_dict(), buffer)
    reloaded = small_encoder(seed=9, positional_encoding="learned", max_len=32)
    reloaded.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    x, mask = random_batch([20, 6], 20)
    with torch.no_grad():
        assert torch.equal(encoder(x, mask)[0], reloaded.eval()(x, mask)[0])


def test_bfloat16_autocast_forward_and_backward():
    encoder = small_encoder().train()
    x, mask = random_batch([15, 8], 15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = encoder(x, mask)
    assert torch.isfinite(out.float()).all()
    out.float()[mask].square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters())


def test_sinusoidal_encoding_extends_past_its_table():
    encoding = SinusoidalPositionalEncoding(D, max_len=8)
    long = encoding(20)
    assert long.shape == (20, D)
    torch.testing.assert_close(long[:8], encoding(8))
    assert long[3, 0] == pytest.approx(math.sin(3.0)) and long[3, 1] == pytest.approx(math.cos(3.0))


def test_a_tiny_batch_can_be_overfit():
    torch.manual_seed(0)
    num_features, num_classes = 6, 4
    projection = nn.Linear(num_features, D)
    encoder = small_encoder(seed=0)
    head = nn.Linear(D, num_classes)
    modules = nn.ModuleList([projection, encoder, head]).train()
    x = torch.randn(8, 24, num_features)
    mask = lengths_to_mask(torch.randint(8, 25, (8,)), 24)
    labels = torch.arange(8) % num_classes
    optimizer = torch.optim.AdamW(modules.parameters(), lr=3e-3)
    for _ in range(200):
        optimizer.zero_grad()
        out, out_mask = encoder(projection(x), mask)
        loss = nn.functional.cross_entropy(head(masked_mean(out, out_mask)), labels)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05


# ---------------------------------------------------------------------------------------------
# argument validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(d_model=30, num_heads=4), "divisible by num_heads"),
        (dict(conv_kernel=6), "odd"),
        (dict(conv_kernel=0), "odd"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(attention_dropout=-0.1), "attention_dropout"),
        (dict(positional_encoding="rotary"), "positional_encoding"),
        (dict(reduce_after_block=4), "reduce_after_block"),
        (dict(reduce_after_block=-1), "reduce_after_block"),
        (dict(reduce_after_block=1, recover_before_block=2), "recover_before_block"),
        (dict(recover_before_block=5), "recover_before_block"),
        (dict(num_blocks=2), "recover_before_block"),
    ],
)
def test_bad_arguments_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_encoder(**overrides)


def test_time_reduction_off_ignores_block_indices():
    encoder = small_encoder(num_blocks=2, time_reduction=False)
    assert encoder.time_reduce is None and encoder.time_recover is None


def test_bad_inputs_raise_clear_errors():
    encoder = small_encoder(positional_encoding="learned", max_len=16)
    x, mask = random_batch([10, 4], 10)
    with pytest.raises(ValueError, match="bool"):
        encoder(x, mask.float())
    with pytest.raises(ValueError, match="shape"):
        encoder(x, mask[:, :5])
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        encoder(torch.randn(2, 10, 8), mask)
    with pytest.raises(ValueError, match="max_len"):
        encoder(torch.randn(1, 17, D), torch.ones(1, 17, dtype=torch.bool))
