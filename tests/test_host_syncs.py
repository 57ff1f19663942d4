"""The shared model code queues work without reading anything back where a GPU would wait.

No GPU is needed: the operators a forward and backward pass dispatch are recorded on the CPU
(``TorchDispatchMode``), and those that make a GPU wait for the host are looked for: ``nonzero``
(an output size that depends on the data), ``_local_scalar_dense`` (``.item()``, ``int()``,
``bool()`` of a tensor). On a GPU the encoder runs padded (``SqueezeformerEncoder.packs``), so the
padded CPU computation is the one checked.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from codes.models.bert_config import build_bert
from codes.models.masking import to_attention_mask, to_bert_4d_mask
from codes.models.squeezeformer import SqueezeformerEncoder

SYNCING_OPS = ("nonzero", "_local_scalar_dense")


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def syncing(self) -> list[str]:
        return sorted({op for op in self.ops if any(name in op for name in SYNCING_OPS)})


def padded_batch(lengths, d=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return torch.randn(len(lengths), max(lengths), d, generator=generator), mask


def small_encoder(**kwargs) -> SqueezeformerEncoder:
    torch.manual_seed(0)
    return SqueezeformerEncoder(d_model=16, num_blocks=4, num_heads=2, ff_dim=32, conv_kernel=5, **kwargs)


def test_the_encoder_packs_on_the_cpu_only():
    encoder = small_encoder()
    assert encoder.packs(torch.zeros(1, 2, 16))
    assert not encoder.packs(torch.zeros(1, 2, 16, device="meta"))  # any other device: padded
    assert not small_encoder(pack_padded_steps=False).packs(torch.zeros(1, 2, 16))


@pytest.mark.parametrize("training", [True, False])
def test_the_padded_encoder_reads_nothing_back(training):
    encoder = small_encoder(pack_padded_steps=False).train(training)
    x, mask = padded_batch([9, 5, 3])
    x.requires_grad_(training)
    with RecordOps() as recorded:
        out, _ = encoder(x, mask)
        if training:
            out.square().sum().backward()
    assert recorded.syncing() == []
    # the packed CPU path does read the number of real steps (why it is kept off GPUs)
    with RecordOps() as packed:
        small_encoder().train(training)(x.detach(), mask)
    assert "aten.nonzero.default" in packed.syncing()


def bert_cfg(attn_implementation: str):
    return OmegaConf.create({
        "d_model": 16,
        "bert": {
            "hidden_size": None, "num_layers": 2, "num_heads": 2, "intermediate_size": None,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "attn_implementation": attn_implementation,
            "gradient_checkpointing": False, "max_position_embeddings": None,
        },
    })  # fmt: skip


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_4d_bert_mask_gives_the_2d_mask_s_outputs_without_reading_it_back(attn_implementation):
    torch.manual_seed(0)
    bert = build_bert(bert_cfg(attn_implementation), max_len=12).eval()
    x, mask = padded_batch([10, 6, 1])
    with torch.no_grad(), RecordOps() as with_2d:
        expected = bert(inputs_embeds=x, attention_mask=to_attention_mask(mask)).last_hidden_state
    with torch.no_grad(), RecordOps() as with_4d:
        got = bert(
            inputs_embeds=x, attention_mask=to_bert_4d_mask(mask, attn_implementation, x.dtype)
        ).last_hidden_state
    real = mask[..., None].expand_as(got)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-6, atol=1e-6)
    assert with_2d.syncing() != []  # the library's padding_mask.all()
    assert with_4d.syncing() == []
