"""Fine-tuning that respects a pretrained stack: layer-wise learning rates, heads first, a slow start.

A model initialised from a checkpoint (``model.init_from``, e.g. NoiseBERT pretraining) has two
kinds of parameters: the pretrained *stack* (the Squeezeformer + BERT modules the checkpoint
fills: ``input_projection``, ``encoder``, ``bert_projection``, ``cls_token``, ``bert``) and the new
*heads* (everything else: the classification heads, the head norm, the demographics encoder).
Training both at one learning rate from the first step lets the random heads' large gradients
rewrite what pretraining found. Three levers, each off at its neutral value:

- **layer-wise learning-rate decay** (``layer_decay``): the stack's levels are numbered from the
  input, ``0`` = the input projection, then each Squeezeformer block (the time reduction and
  recovery at the block they follow or precede), the CLS token with BERT's embeddings and the
  projection to its width, then each BERT layer; the heads are the level above the top. A
  parameter ``d`` levels below the heads learns at ``lr x stack_lr_scale x layer_decay^d``
  (``layer_decay=1``: one rate for the whole stack, ``stack_lr_scale`` only);
- **heads first** (``freeze_epochs``): the stack's learning rate is 0 for the first k epochs
  (AdamW with a learning rate of 0 leaves a parameter exactly as it is, weight decay included);
- **a slow start** (``stack_warmup_epochs``): after its frozen epochs the stack's rate rises
  linearly from 0 to its full value over this many epochs, on top of the run's own warm-up and
  cosine schedule.

:func:`finetune_param_groups` builds the optimizer's parameter groups and
:func:`finetune_schedule` the scheduler (``transformers.get_cosine_schedule_with_warmup``, with one
multiplier per group). Both are pure functions of the model and the settings, so a resumed run
rebuilds the same groups and restores the scheduler's step from ``last.pt``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import get_cosine_schedule_with_warmup

__all__ = [
    "STACK_MODULES",
    "FinetunePlan",
    "finetune_param_groups",
    "finetune_schedule",
    "stack_levels",
]

# the modules a NoiseBERT checkpoint fills (codes/noisebert/model.py names them as the classifiers do)
STACK_MODULES = ("input_projection", "encoder", "bert_projection", "cls_token", "bert")

_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.")
_BERT_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")


@dataclass(frozen=True)
class FinetunePlan:
    """The fine-tuning settings, checked (a config section's values: ``FinetunePlan.from_config``)."""

    layer_decay: float = 1.0
    stack_lr_scale: float = 1.0
    freeze_epochs: int = 0
    stack_warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        values = (self.layer_decay, self.stack_lr_scale, self.freeze_epochs, self.stack_warmup_epochs)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"finetune: every value must be finite, got {self}")
        checks = (
            (0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (self.stack_lr_scale >= 0, f"stack_lr_scale must be >= 0, got {self.stack_lr_scale}"),
            (self.freeze_epochs >= 0, f"freeze_epochs must be >= 0, got {self.freeze_epochs}"),
            (
                self.stack_warmup_epochs >= 0,
                f"stack_warmup_epochs must be >= 0, got {self.stack_warmup_epochs}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"finetune: {message}")

    @classmethod
    def from_config(cls, finetune_cfg) -> FinetunePlan:
        return cls(
            layer_decay=float(finetune_cfg.layer_decay),
            stack_lr_scale=float(finetune_cfg.stack_lr_scale),
            freeze_epochs=int(finetune_cfg.freeze_epochs),
            stack_warmup_epochs=float(finetune_cfg.stack_warmup_epochs),
        )

    @property
    def neutral(self) -> bool:
        """Whether the plan changes nothing (one learning rate, no freezing, no extra warm-up)."""
        return self == FinetunePlan()


def stack_levels(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """``({parameter name: level}, heads_level)`` for the pretrained stack's parameters.

    Levels count from the input (0 = ``input_projection``); ``heads_level`` is one above the top
    BERT layer. Parameters outside :data:`STACK_MODULES` are heads and are not in the dict.
    """
    encoder = getattr(model, "encoder", None)
    n_blocks = len(getattr(encoder, "blocks", ()))
    bert = getattr(model, "bert", None)
    n_bert_layers = len(bert.encoder.layer) if bert is not None else 0
    reduce_after = getattr(encoder, "reduce_after_block", None)
    recover_before = getattr(encoder, "recover_before_block", None)
    embeddings_level = 1 + n_blocks  # the CLS token, BERT's embeddings, the projection to its width
    levels: dict[str, int] = {}
    for name, _ in model.named_parameters():
        root = name.split(".", 1)[0]
        if root not in STACK_MODULES:
            continue
        if root == "input_projection":
            level = 0
        elif root == "encoder":
            block = _BLOCK.match(name)
            if block:
                level = 1 + int(block.group(1))
            elif name.startswith("encoder.time_reduce.") and reduce_after is not None:
                level = 1 + int(reduce_after)  # with the block it follows
            elif name.startswith("encoder.time_recover.") and recover_before is not None:
                level = 1 + min(int(recover_before), n_blocks - 1)  # with the block it feeds
            else:
                level = 1
        elif root == "bert":
            layer = _BERT_LAYER.match(name)
            level = embeddings_level + 1 + int(layer.group(1)) if layer else embeddings_level
            if name.startswith("bert.pooler."):
                level = embeddings_level + n_bert_layers
        else:  # cls_token, bert_projection
            level = embeddings_level
        levels[name] = level
    return levels, embeddings_level + n_bert_layers + 1


def finetune_param_groups(
    model: torch.nn.Module,
    lr: float,
    plan: FinetunePlan,
    extra_scale: Callable[[str], float] | None = None,
) -> list[dict]:
    """AdamW parameter groups: the heads at ``lr``, each stack level at its decayed rate.

    Each group carries ``"stack": bool`` (what :func:`finetune_schedule` freezes and warms up)
    and ``"level"``. ``extra_scale(name)`` multiplies a parameter's rate on top (an experiment's
    own groups, e.g. exp019's ``trainer.bert_lr_scale``); the parameters of one level and rate
    share a group. Frozen parameters (``requires_grad=False``) are left out, as the optimizer would
    skip them.
    """
    levels, heads_level = stack_levels(model)
    groups: dict[tuple[bool, int, float], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        in_stack = name in levels
        level = levels.get(name, heads_level)
        scale = plan.stack_lr_scale * plan.layer_decay ** (heads_level - level) if in_stack else 1.0
        if extra_scale is not None:
            scale *= extra_scale(name)
        key = (in_stack, level, scale)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * scale, "stack": in_stack, "level": level}
        groups[key]["params"].append(parameter)
    return list(groups.values())


def stack_multiplier(step: int, plan: FinetunePlan, steps_per_epoch: int) -> float:
    """The stack's extra learning-rate factor at optimizer step ``step``: 0 while frozen, then a
    linear ramp from 0 to 1 over ``stack_warmup_epochs`` (the first step after freezing > 0)."""
    frozen_steps = plan.freeze_epochs * steps_per_epoch
    if step < frozen_steps:
        return 0.0
    ramp_steps = plan.stack_warmup_epochs * steps_per_epoch
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - frozen_steps + 1) / ramp_steps)


def finetune_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    plan: FinetunePlan,
    steps_per_epoch: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's warm-up + cosine schedule for every group, times :func:`stack_multiplier` for the
    stack's groups (``"stack": True``). With a neutral plan this is exactly
    ``get_cosine_schedule_with_warmup``."""
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if plan.neutral:
        return scheduler
    base = scheduler.lr_lambdas[0]

    def stack_lambda(step: int) -> float:
        return base(step) * stack_multiplier(step, plan, steps_per_epoch)

    scheduler.lr_lambdas = [stack_lambda if group.get("stack") else base for group in optimizer.param_groups]
    # the learning rates of step 0 under the new multipliers (the constructor applied the base one)
    for group, lr_lambda, initial in zip(
        optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True
    ):
        group["lr"] = initial * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler
