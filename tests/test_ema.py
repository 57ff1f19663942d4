"""EMA with warm-up."""

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from codes.common.ema import ema_warmup_decay, get_ema_multi_avg_fn_with_warmup


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
