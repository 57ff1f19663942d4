"""NoiseBERT's loss: masked-step reconstruction MSE plus lambda times a CLS-attention penalty.

- ``masked_mse``: the mean squared error over the masked steps and all features; unmasked and
  padded steps have no influence. A batch without masked steps gives 0.
- ``noisy_attention_mass``: per sample, the share of the CLS attention over the step keys that
  falls on the noise region (per-step bool ``(B, T)``: the noisy steps, or the steps of the
  noisy intervals), averaged over heads and over the chosen layers: ``(B,)`` in [0, 1]. The CLS
  key's own probability is left out (the row is renormalised over the steps): otherwise the
  penalty is met by the CLS attending only to itself, which carries no information.
- ``clean_summary`` / ``cls_summary_loss``: the CLS objective's target, the per-channel mean and
  standard deviation of the clean sequence over its real steps ``(B, 2F)``, and the mean squared
  error of the CLS output's prediction of it. The target is a property of the clean signal, not
  of the noise: attending to noisy steps only adds error to it.
- ``attention_penalty``: the mean over the samples that have a noisy step of ``mass`` (form
  ``"mass"``) or ``-log(1 - mass)`` (form ``"log"``, with ``1 - mass`` clamped to at least
  ``log_floor`` so that it stays finite); samples without a noisy step contribute nothing, and a
  batch without any gives exactly 0 (never a NaN). Everything is vectorised over the batch.
"""

from __future__ import annotations

import torch

from codes.models.masking import masked_mean

__all__ = [
    "PENALTY_FORMS",
    "attention_penalty",
    "clean_summary",
    "cls_summary_loss",
    "masked_mse",
    "noise_region",
    "noisy_attention_mass",
]

PENALTY_FORMS = ("mass", "log")


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``(B, T, F), (B, T, F), (B, T) bool`` -> scalar mean over masked steps and features."""
    squared = torch.where(masked.unsqueeze(-1), (prediction.float() - target.float()).square(), 0.0)
    # counted as an integer: a count in the prediction's dtype is rounded under bf16 autocast
    # (48,720 masked values came out 48,640 in bf16, biasing the mean)
    count = masked.sum() * prediction.shape[-1]
    return squared.sum() / count.clamp(min=1).to(torch.float32)


def noise_region(batch: dict[str, torch.Tensor], region: str = "intervals") -> torch.Tensor:
    """The steps the penalty looks at, ``(B, T)`` bool: ``"steps"`` (noisy steps) or ``"intervals"``."""
    if region == "steps":
        return batch["noisy"]
    if region == "intervals":
        index = batch["interval_index"]  # (B, T), -1 at padding
        hot = batch["noise_intervals"] > 0.5  # (B, K)
        return torch.gather(hot, 1, index.clamp(min=0)) & (index >= 0)
    raise ValueError(f"region must be 'steps' or 'intervals', got {region!r}")


def noisy_attention_mass(cls_attention: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``cls_attention (B, layers, heads, T), region (B, T) bool`` -> ``(B,)`` mass on the region.

    The mass is taken among the step keys: the CLS key's own share is left out and the rest
    renormalised, so attending to itself is no way around the penalty.
    """
    attention = cls_attention.float()
    on_steps = attention.sum(-1).clamp(min=1e-12)  # (B, layers, heads)
    on_region = torch.where(region[:, None, None, :], attention, 0.0).sum(-1)  # (B, layers, heads)
    return (on_region / on_steps).mean(dim=(1, 2))


def attention_penalty(
    cls_attention: torch.Tensor, region: torch.Tensor, form: str = "mass", log_floor: float = 1e-4
) -> torch.Tensor:
    """Scalar penalty over the samples with a noisy step (0 when there are none)."""
    if form not in PENALTY_FORMS:
        raise ValueError(f"form must be one of {PENALTY_FORMS}, got {form!r}")
    mass = noisy_attention_mass(cls_attention, region)  # (B,)
    if form == "log":
        per_sample = -torch.log((1.0 - mass).clamp(min=log_floor))
    else:
        per_sample = mass
    has_noise = region.any(dim=1)  # (B,)
    total = torch.where(has_noise, per_sample, 0.0).sum()
    return total / has_noise.sum().clamp(min=1)


def clean_summary(clean: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """``clean (B, T, F), padding_mask (B, T) bool (True = real)`` -> ``(B, 2F)``: per-channel mean
    and standard deviation over the real steps (float32; padded steps have no influence)."""
    clean = clean.float()
    mean = masked_mean(clean, padding_mask)  # (B, F)
    variance = masked_mean((clean - mean.unsqueeze(1)).square(), padding_mask)  # (B, F)
    return torch.cat([mean, variance.sqrt()], dim=-1)


def cls_summary_loss(
    prediction: torch.Tensor, clean: torch.Tensor, padding_mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error of the CLS output's ``(B, 2F)`` prediction of :func:`clean_summary`."""
    return (prediction.float() - clean_summary(clean, padding_mask)).square().mean()
