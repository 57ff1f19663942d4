"""EMA with warm-up."""

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from codes.common.ema import WarmupEMA, ema_warmup_decay, get_ema_multi_avg_fn_with_warmup


def test_decay_warms_up_then_stays_at_its_value():
    assert ema_warmup_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_warmup_decay(0.999, 90) == pytest.approx(0.91)
    assert ema_warmup_decay(0.999, 10**6) == 0.999


def test_averaged_model_follows_the_hand_computed_average():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn_with_warmup(0.5), use_buffers=True)
    expected = None
    for step, value in enumerate([1.0, 3.0, 5.0, 7.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update_parameters(model)
        if step == 0:
            expected = value  # the first update copies the weights
        else:
            decay = ema_warmup_decay(0.5, step)
            expected = decay * expected + (1 - decay) * value
        assert ema.module.weight.item() == pytest.approx(expected)


class _TinyNet(torch.nn.Module):
    """Parameters, a BatchNorm (float running statistics and an int64 counter) and a plain buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.norm = torch.nn.BatchNorm1d(3)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.steps += 3
        return self.norm(self.linear(x))


def _train_steps(model, optimizer, emas, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(8, 4, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for ema in emas:
            ema.update_parameters(model)


def _assert_same_state(first, second):
    a, b = first.state_dict(), second.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("decay", [0.5, 0.999])
def test_warmup_ema_equals_the_averaged_model_form_bit_for_bit(decay):
    torch.manual_seed(0)
    model = _TinyNet()
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn_with_warmup(decay), use_buffers=True)
    ema = WarmupEMA(model, decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    _train_steps(model, optimizer, [reference, ema], steps=25, seed=1)
    _assert_same_state(reference, ema)
    assert ema.num_averaged == 25 and int(ema.n_averaged) == 25


def test_warmup_ema_resumed_from_a_state_dict_continues_exactly():
    torch.manual_seed(0)
    model = _TinyNet()
    straight = WarmupEMA(model, 0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    _train_steps(model, optimizer, [straight], steps=7, seed=1)
    resumed = WarmupEMA(model, 0.9)  # a fresh one (count 0), then the saved state
    resumed.load_state_dict(straight.state_dict())
    assert resumed.num_averaged == 7
    _train_steps(model, optimizer, [straight, resumed], steps=5, seed=2)
    _assert_same_state(straight, resumed)
    # and a checkpoint of one form loads into the other
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn_with_warmup(0.9), use_buffers=True)
    reference.load_state_dict(resumed.state_dict())
    _train_steps(model, optimizer, [reference, resumed], steps=3, seed=3)
    _assert_same_state(reference, resumed)


def test_warmup_ema_update_reads_nothing_back_from_the_device():
    """No ``.item()``/``int()`` (``_local_scalar_dense``), no copy to another device, no ``nonzero``:
    on a GPU each of them would wait for the queued work."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model = _TinyNet()
    ema = WarmupEMA(model, 0.99)
    ema.update_parameters(model)  # the first update copies
    for _ in range(2):
        with RecordOps() as recorded:
            ema.update_parameters(model)
        syncing = [
            op for op in recorded.ops if "_local_scalar_dense" in op or "nonzero" in op or "_to_copy" in op
        ]
        assert syncing == [] and any("_foreach_lerp_" in op for op in recorded.ops)
