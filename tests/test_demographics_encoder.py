"""The demographics encoder's scaling and missing-value rules."""

import math

import torch

from codes.models.demographics import DEMOGRAPHIC_FIELDS, DemographicsEncoder


def test_missing_values_give_the_all_unknown_encoding_and_no_nan():
    encoder = DemographicsEncoder(out_dim=8).eval()
    row = torch.tensor([[1.0, 30.0, 0.0, 1.0, 170.0, 55.0, 30.0]])
    nan_row = torch.full((1, 7), math.nan)
    out_nan = encoder(nan_row)
    assert torch.isfinite(out_nan).all()
    assert torch.allclose(out_nan, encoder(None, batch_size=1))
    assert not torch.allclose(out_nan, encoder(row))
    # an out-of-range category counts as unknown
    odd = row.clone()
    odd[0, DEMOGRAPHIC_FIELDS.index("sex")] = 7.0
    unknown_sex = row.clone()
    unknown_sex[0, DEMOGRAPHIC_FIELDS.index("sex")] = math.nan
    assert torch.allclose(encoder(odd), encoder(unknown_sex))


def test_every_field_influences_the_output_and_gradients_flow():
    encoder = DemographicsEncoder(out_dim=8).eval()
    row = torch.tensor([[1.0, 30.0, 0.0, 1.0, 170.0, 55.0, 30.0]])
    base = encoder(row)
    for k, name in enumerate(DEMOGRAPHIC_FIELDS):
        changed = row.clone()
        changed[0, k] = (
            1.0 - changed[0, k] if name in ("adult_child", "sex", "handedness") else changed[0, k] + 5
        )
        assert not torch.allclose(encoder(changed), base), name
    encoder.train()
    encoder(row.repeat(4, 1)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
