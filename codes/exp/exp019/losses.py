"""The training loss of this experiment."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import target_labels


def compute_loss(outputs: dict[str, torch.Tensor], labels: torch.Tensor, trainer_cfg) -> torch.Tensor:
    """Cross-entropy over the 18 gestures + ``bce_weight`` x BCE on target-vs-non-target."""
    gesture_loss = F.cross_entropy(
        outputs["gesture_logits"].float(), labels, label_smoothing=trainer_cfg.label_smoothing
    )
    pos_weight = torch.tensor(trainer_cfg.bce_pos_weight, device=labels.device)
    target_loss = F.binary_cross_entropy_with_logits(
        outputs["target_logit"].float(), target_labels(labels), pos_weight=pos_weight
    )
    return gesture_loss + trainer_cfg.bce_weight * target_loss
