"""The training loss of this experiment."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import target_labels


def _mixed(per_sample: torch.Tensor, partner_term: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return (lam * per_sample + (1 - lam) * partner_term).mean()


def compute_loss(
    outputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    trainer_cfg,
    pos_weight: torch.Tensor | None = None,
    orientations: torch.Tensor | None = None,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cross-entropy over the 18 gestures + ``bce_weight`` x BCE on target-vs-non-target
    (+ ``orientation_weight`` x cross-entropy over the orientations when the model has that head).

    ``pos_weight``: ``trainer.bce_pos_weight`` as a tensor on the device, made once per fold (not
    per step; made here when not given). Without ``orientations`` the orientation head joins the
    loss with weight 0 (every parameter still gets a gradient, which DDP needs). ``mix = (partner, lam)``: a mixup batch; every term is ``lam`` x the loss against
    the sequence's own label + ``(1 - lam)`` x the loss against its partner's, which for the
    binary head is the BCE of the mixed target label ``lam t + (1 - lam) t_partner`` (BCE is
    linear in its label).
    """
    if pos_weight is None:
        pos_weight = torch.tensor(trainer_cfg.bce_pos_weight, device=labels.device)
    logits = outputs["gesture_logits"].float()
    target_logit = outputs["target_logit"].float()
    smoothing = trainer_cfg.label_smoothing
    if mix is None:
        gesture_loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        target_loss = F.binary_cross_entropy_with_logits(
            target_logit, target_labels(labels), pos_weight=pos_weight
        )
    else:
        partner, lam = mix
        gesture_loss = _mixed(
            F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none"),
            F.cross_entropy(logits, labels[partner], label_smoothing=smoothing, reduction="none"),
            lam,
        )
        mixed_target = lam * target_labels(labels) + (1 - lam) * target_labels(labels[partner])
        target_loss = F.binary_cross_entropy_with_logits(target_logit, mixed_target, pos_weight=pos_weight)
    loss = gesture_loss + trainer_cfg.bce_weight * target_loss
    if "orientation_logits" in outputs and (orientations is None or trainer_cfg.orientation_weight <= 0):
        return loss + 0.0 * outputs["orientation_logits"].float().sum()
    if "orientation_logits" in outputs:
        orientation_logits = outputs["orientation_logits"].float()
        known = orientations >= 0
        per_sample = F.cross_entropy(orientation_logits, orientations.clamp(min=0), reduction="none")
        if mix is not None:
            partner, lam = mix
            partner_term = F.cross_entropy(
                orientation_logits, orientations[partner].clamp(min=0), reduction="none"
            )
            per_sample = lam * per_sample + (1 - lam) * partner_term
            known = known & (orientations[partner] >= 0)
        loss = loss + trainer_cfg.orientation_weight * (per_sample * known).sum() / known.sum().clamp(min=1)
    return loss
