"""The training loss of this experiment."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codes.common.schema import GESTURE_ORIENTATION_PAIRS, GESTURES, ORIENTATIONS

from .dataset import target_labels

# (18, 4) index of each gesture x orientation into GESTURE_ORIENTATION_PAIRS; -1 for the 21
# combinations the protocol never records
PAIR_INDEX = torch.full((len(GESTURES), len(ORIENTATIONS)), -1, dtype=torch.int64)
for _index, (_gesture, _orientation) in enumerate(GESTURE_ORIENTATION_PAIRS):
    PAIR_INDEX[GESTURES.index(_gesture), ORIENTATIONS.index(_orientation)] = _index


def pair_labels(labels: torch.Tensor, orientations: torch.Tensor) -> torch.Tensor:
    """(B,) index into GESTURE_ORIENTATION_PAIRS; -1 where the gesture or orientation is unknown
    or the pair is not one of the 51."""
    known = (labels >= 0) & (orientations >= 0)
    table = PAIR_INDEX.to(labels.device)
    pairs = table[labels.clamp(min=0), orientations.clamp(min=0)]
    return torch.where(known, pairs, torch.full_like(pairs, -1))


def _mixed(per_sample: torch.Tensor, partner_term: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return (lam * per_sample + (1 - lam) * partner_term).mean()


def _known_mean(
    logits: torch.Tensor,
    classes: torch.Tensor,
    mix: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Cross-entropy over the sequences whose class is known (>= 0), mixed as the gesture term."""
    known = classes >= 0
    per_sample = F.cross_entropy(logits, classes.clamp(min=0), reduction="none")
    if mix is not None:
        partner, lam = mix
        partner_term = F.cross_entropy(logits, classes[partner].clamp(min=0), reduction="none")
        per_sample = lam * per_sample + (1 - lam) * partner_term
        known = known & (classes[partner] >= 0)
    return (per_sample * known).sum() / known.sum().clamp(min=1)


def compute_loss(
    outputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    trainer_cfg,
    pos_weight: torch.Tensor | None = None,
    orientations: torch.Tensor | None = None,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cross-entropy over the 18 gestures + ``bce_weight`` x BCE on target-vs-non-target
    (+ ``orientation_weight`` x cross-entropy over the orientations and ``pair_weight`` x
    cross-entropy over the 51 gesture x orientation pairs, for the heads the model has).

    ``pos_weight``: ``trainer.bce_pos_weight`` as a tensor on the device, made once per fold (not
    per step; made here when not given). Without ``orientations`` the orientation and pair heads
    join the loss with weight 0 (every parameter still gets a gradient, which DDP needs); a
    sequence of unknown orientation adds nothing to them. ``mix = (partner, lam)``: a mixup
    batch; every term is ``lam`` x the loss against the sequence's own label + ``(1 - lam)`` x
    the loss against its partner's, which for the binary head is the BCE of the mixed target
    label ``lam t + (1 - lam) t_partner`` (BCE is linear in its label).
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
    auxiliary = (
        ("orientation_logits", trainer_cfg.orientation_weight, lambda: orientations),
        ("pair_logits", trainer_cfg.pair_weight, lambda: pair_labels(labels, orientations)),
    )
    for name, weight, classes in auxiliary:
        if name not in outputs:
            continue
        if orientations is None or weight <= 0:
            loss = loss + 0.0 * outputs[name].float().sum()
        else:
            loss = loss + weight * _known_mean(outputs[name].float(), classes(), mix)
    return loss
