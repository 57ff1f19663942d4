"""Length-aware batches: a batch costs its own longest sequence, not ``data.max_len``.

Sequences are padded at the end (``codes.common.sequences.pad_sequences``: real steps first),
and every model here is mask-correct (the contract suite tests that padding changes no output).
So a batch can be cut to its longest real sequence before the model sees it, and the padded
steps nobody reads are never computed. Three settings of an experiment's ``data`` section:

- ``pad_to_batch``: cut every batch (training, validation, the OOF pass, batch inference) to its
  longest real sequence. Validation and inference then also batch their sequences in length
  order (:func:`length_sorted_batches`), so that a batch holds similar lengths; the answers come
  back in the input order. Off: every batch is ``max_len`` steps, as before.
- ``length_bucket``: with ``machine.compile=true`` (and CUDA graphs, ``compile_mode=
  reduce-overhead``), cut lengths are rounded up to a multiple of this (at most ``max_len``), so
  that at most ``ceil(max_len / length_bucket)`` lengths (compiled graphs) occur. Eager runs cut
  to the exact longest length.
- ``group_by_length``: the training order is shuffled, cut into mega-batches of
  ``group_mega_batches`` batches (None: Hugging Face's rule, at most 50 and at least 4
  mega-batches per epoch), each sorted by length, then batched (:func:`length_grouped_order`:
  Hugging Face's own ``group_by_length`` function): a batch holds similar lengths, so it is cut
  shorter. The same for a given epoch seed, so a resumed run repeats it.

Empty sequences never reach a batch: a sequence exists as the run of rows with its
``sequence_id`` (``codes.common.sequences``), so it has at least one step; a file or frame with
no rows is refused there (``DataFileError``), and ``predict`` answers an empty sequence with the
fallback gesture before any model runs (``codes/inference/input_path.py``). A batch whose
sequences are all one step long is cut to 1 step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

DEFAULT_LENGTH_BUCKET = 32


def rounded_length(longest: int, max_len: int, multiple: int = 1) -> int:
    """``longest`` rounded up to a multiple of ``multiple``, within ``[1, max_len]``."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if multiple < 1:
        raise ValueError(f"the length multiple must be >= 1, got {multiple}")
    longest = max(int(longest), 1)
    return min(-(-longest // multiple) * multiple, max_len)


@dataclass(frozen=True)
class BatchCut:
    """How a batch of ``max_len``-padded sequences is cut: to its longest real length, rounded up
    to ``multiple`` (1: the exact longest length)."""

    max_len: int
    multiple: int = 1

    @classmethod
    def from_config(cls, cfg) -> BatchCut | None:
        """The cut of a run's settings, or None when ``data.pad_to_batch`` is off (or absent: an
        experiment from before the switch)."""
        data = cfg.data
        if not data.get("pad_to_batch", False):
            return None
        bucket = data.get("length_bucket", DEFAULT_LENGTH_BUCKET)
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"data.length_bucket={bucket!r} must be a whole number >= 1 (32: the default)")
        return cls(int(data.max_len), bucket if cfg.machine.get("compile", False) else 1)

    def length(self, lengths: torch.Tensor | np.ndarray) -> int:
        """The cut length of a batch of real ``lengths`` (read on the host: no device sync)."""
        longest = int(lengths.max()) if len(lengths) else 1
        return rounded_length(longest, self.max_len, self.multiple)

    def cut(self, items: Sequence, step_items: Sequence[int], length: int) -> tuple:
        """``items`` with the time axis (dim 1) of ``step_items`` cut to ``length`` steps."""
        return tuple(item[:, :length] if i in step_items else item for i, item in enumerate(items))

    def cut_by_mask(
        self, items: Sequence[torch.Tensor], step_items: Sequence[int], mask_item: int = 1
    ) -> tuple:
        """``items`` cut to the longest real sequence of ``items[mask_item]`` (a host tensor)."""
        return self.cut(items, step_items, self.length(items[mask_item].sum(dim=1)))

    def cut_dict(self, batch: dict[str, torch.Tensor], mask_key: str, step_keys: Sequence[str]) -> dict:
        """A dict batch (NoiseBERT's items) with ``step_keys`` cut to the longest of ``mask_key``."""
        length = self.length(batch[mask_key].sum(dim=1))
        return {k: v[:, :length] if k in step_keys else v for k, v in batch.items()}


def check_batching_settings(cfg) -> None:
    """Refuse, before a run starts, a bad ``data.length_bucket`` (when ``data.pad_to_batch`` is
    on) or ``data.group_mega_batches`` (when ``data.group_by_length`` is on), naming the setting."""
    BatchCut.from_config(cfg)
    data = cfg.data
    mega = data.get("group_mega_batches")
    if data.get("group_by_length", False) and mega is not None:
        if isinstance(mega, bool) or not isinstance(mega, int) or mega < 1:
            raise ValueError(
                f"data.group_mega_batches={mega!r} must be a whole number >= 1, or null (the default)"
            )


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Indices of ``batch_size`` sequences at a time in length order (stable): batches of similar
    lengths for evaluation, whose results are put back in the input order by the caller."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def length_grouped_order(
    lengths: torch.Tensor, batch_size: int, mega_batches: int | None, generator: torch.Generator
) -> torch.Tensor:
    """A permutation of ``range(len(lengths))`` whose runs of ``batch_size`` hold similar lengths:
    Hugging Face's ``group_by_length`` order (``transformers.trainer_pt_utils.
    get_length_grouped_indices``): shuffled by ``generator``, cut into mega-batches of
    ``mega_batches x batch_size`` sequences (None: ``min(50, n / (4 x batch_size))``, so that a
    small training set still has 4 mega-batches to shuffle), each sorted by length, longest first,
    with the longest sequence of all in the first batch (an out-of-memory error comes first)."""
    if mega_batches is not None and mega_batches < 1:
        raise ValueError(f"group_mega_batches must be >= 1 or None, got {mega_batches}")
    indices = get_length_grouped_indices(lengths.tolist(), batch_size, mega_batches, generator)
    return torch.tensor(indices, dtype=torch.int64)


def cached_training_batches(
    cached: Sequence[torch.Tensor],
    batches: Sequence[torch.Tensor],
    lengths: torch.Tensor,
    cut: BatchCut | None,
    step_items: Sequence[int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, ...]]:
    """An epoch's batches from a fold's tensors already on the device (``cached``): ``batches``
    are host index tensors, ``lengths`` the host real lengths of the fold's sequences, and with a
    ``cut`` the ``step_items`` (features, mask) are cut to the batch's longest sequence (the
    length is read on the host: no device sync)."""
    for batch in batches:
        index = batch.to(cached[0].device)
        items = tuple(t[index] for t in cached)
        yield items if cut is None else cut.cut(items, step_items, cut.length(lengths[batch]))
