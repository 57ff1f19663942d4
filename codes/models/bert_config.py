"""The ``BertConfig`` of a Squeezeformer + BERT stack (exp018 and NoiseBERT), validated at start-up.

Settings come from a ``model`` config section with ``d_model`` and a ``bert`` group
(``hidden_size``, ``num_layers``, ``num_heads``, ``intermediate_size``, ``hidden_dropout``,
``attention_dropout``, ``attn_implementation``, ``max_position_embeddings``). Nothing is
downloaded: the config is built locally and the model starts from random weights.
"""

from __future__ import annotations

from transformers import BertConfig, BertModel

from codes.models.squeezeformer import SqueezeformerEncoder

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "ModelConfigError",
    "build_bert",
    "build_bert_config",
    "build_squeezeformer",
]

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


class ModelConfigError(ValueError):
    """A model setting that cannot work, found at start-up."""


def build_bert_config(cfg, max_len: int) -> BertConfig:
    """A ``BertConfig`` for the head, validated with errors that name the setting to change."""
    bert = cfg.bert
    hidden = bert.hidden_size or cfg.d_model
    if hidden % bert.num_heads != 0:
        raise ModelConfigError(
            f"model.bert.hidden_size ({hidden}) must be divisible by model.bert.num_heads ({bert.num_heads})"
        )
    if bert.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ModelConfigError(
            f"model.bert.attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {bert.attn_implementation!r}"
        )
    positions = bert.max_position_embeddings or max_len + 1
    if positions < max_len + 1:
        raise ModelConfigError(
            f"model.bert.max_position_embeddings ({positions}) must cover data.max_len + 1 = {max_len + 1} "
            "(the sequence plus the CLS token)"
        )
    return BertConfig(
        vocab_size=1,  # token ids are never used: the input is inputs_embeds
        type_vocab_size=1,
        hidden_size=hidden,
        num_hidden_layers=bert.num_layers,
        num_attention_heads=bert.num_heads,
        intermediate_size=bert.intermediate_size or 4 * hidden,
        hidden_dropout_prob=bert.hidden_dropout,
        attention_probs_dropout_prob=bert.attention_dropout,
        max_position_embeddings=positions,
        attn_implementation=bert.attn_implementation,
    )


def build_squeezeformer(cfg, max_len: int) -> SqueezeformerEncoder:
    """The Squeezeformer encoder of a ``model`` config section."""
    return SqueezeformerEncoder(
        d_model=cfg.d_model,
        num_blocks=cfg.num_blocks,
        num_heads=cfg.num_heads,
        ff_dim=cfg.ff_dim,
        conv_kernel=cfg.conv_kernel,
        conv_expansion=cfg.conv_expansion,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        time_reduction=cfg.time_reduction,
        positional_encoding=cfg.positional_encoding,
        max_len=max_len,
        # a speed setting only (same weights, same results): run configs saved before it existed
        # have no such key, and they still load, packed
        pack_padded_steps=cfg.get("pack_padded_steps", True),
    )


def build_bert(cfg, max_len: int) -> BertModel:
    """``BertModel`` without pooler, random weights, optional gradient checkpointing.

    The input is always ``inputs_embeds``: the word-embedding table is never used, so it is
    frozen (DistributedDataParallel would otherwise wait for its gradient forever; the optimizer
    skips it either way, so the numbers are the same).
    """
    bert = BertModel(build_bert_config(cfg, max_len), add_pooling_layer=False)
    bert.get_input_embeddings().weight.requires_grad_(False)
    if cfg.bert.gradient_checkpointing:
        bert.gradient_checkpointing_enable()
    return bert
