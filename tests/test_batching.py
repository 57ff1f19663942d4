"""Length-aware batches (``codes/common/batching.py``): cut lengths, buckets, grouping by length,
the epoch's batches under torchrun, NoiseBERT's collate, and a bounded number of compiled graphs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from codes.common.batching import (
    BatchCut,
    cached_training_batches,
    length_grouped_order,
    length_sorted_batches,
    rounded_length,
)
from codes.common.distributed import DistributedContext
from codes.common.training import FoldRun


@pytest.mark.parametrize(
    ("longest", "max_len", "multiple", "expected"),
    [
        (37, 200, 1, 37),  # eager: the exact longest length
        (37, 200, 32, 64),  # a bucket: rounded up to a multiple
        (64, 200, 32, 64),  # already a multiple
        (1, 200, 32, 32),  # one-step sequences: the first bucket
        (1, 200, 1, 1),
        (0, 200, 1, 1),  # never an empty batch
        (199, 200, 32, 200),  # the last bucket is cut at max_len (224 > 200)
        (5, 20, 32, 20),  # max_len below the bucket size: max_len
        (300, 200, 1, 200),
    ],
)
def test_rounded_length_against_hand_computed_cases(longest, max_len, multiple, expected):
    assert rounded_length(longest, max_len, multiple) == expected


def test_rounded_length_refuses_bad_settings():
    with pytest.raises(ValueError, match="max_len"):
        rounded_length(5, 0, 1)
    with pytest.raises(ValueError, match="multiple"):
        rounded_length(5, 10, 0)


def config(**data):
    base = {"data": {"max_len": 200, **data}, "machine": {"compile": False}}
    return OmegaConf.create(base)


def test_the_cut_follows_the_settings():
    assert BatchCut.from_config(config()) is None  # an experiment from before the switch
    assert BatchCut.from_config(config(pad_to_batch=False)) is None
    assert BatchCut.from_config(config(pad_to_batch=True)) == BatchCut(200, 1)
    compiled = config(pad_to_batch=True, length_bucket=16)
    compiled.machine.compile = True
    assert BatchCut.from_config(compiled) == BatchCut(200, 16)
    for bad in (0, -32, 1.5, True):
        with pytest.raises(ValueError, match=r"data\.length_bucket"):
            BatchCut.from_config(config(pad_to_batch=True, length_bucket=bad))


def padded_batch(lengths: list[int], max_len: int, n_features: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    features = torch.randn(len(lengths), max_len, n_features, generator=generator) * mask[..., None]
    return features, mask


def test_a_cut_keeps_every_real_step_and_drops_only_padding():
    features, mask = padded_batch([3, 17, 9], 40)
    extra = torch.arange(3)
    cut_features, cut_mask, same = BatchCut(40).cut_by_mask((features, mask, extra), step_items=(0, 1))
    assert cut_features.shape == (3, 17, 3) and cut_mask.shape == (3, 17)
    assert same is extra
    assert torch.equal(cut_mask.sum(1), mask.sum(1))  # no real step lost
    assert torch.equal(cut_features, features[:, :17])
    assert not features[:, 17:].any()  # what was dropped was padding


def test_all_one_step_sequences_cut_to_one_step_or_to_the_first_bucket():
    features, mask = padded_batch([1, 1, 1, 1], 64)
    assert BatchCut(64).cut_by_mask((features, mask), (0, 1))[0].shape == (4, 1, 3)
    assert BatchCut(64, 32).cut_by_mask((features, mask), (0, 1))[0].shape == (4, 32, 3)
    assert BatchCut(20, 32).cut_by_mask((features[:, :20], mask[:, :20]), (0, 1))[1].shape == (4, 20)


def test_cached_training_batches_cut_each_batch_to_its_own_longest_sequence():
    lengths = [5, 40, 12, 7, 3, 9]
    features, mask = padded_batch(lengths, 48)
    labels = torch.arange(6)
    batches = [torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([4, 5])]
    got = list(cached_training_batches((features, mask, labels), batches, mask.sum(1), BatchCut(48)))
    assert [b[0].shape[1] for b in got] == [12, 40, 9]
    for batch, (f, m, y) in zip(batches, got, strict=True):
        assert torch.equal(f, features[batch, : f.shape[1]]) and torch.equal(y, labels[batch])
        assert torch.equal(m.sum(1), mask[batch].sum(1))
    plain = list(cached_training_batches((features, mask, labels), batches, mask.sum(1), None))
    assert all(torch.equal(f, features[b]) for b, (f, _, _) in zip(batches, plain, strict=True))


def test_length_sorted_batches_cover_every_sequence_once_in_length_order():
    lengths = np.array([9, 3, 9, 1, 20, 3, 7])
    batches = list(length_sorted_batches(lengths, 3))
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = np.concatenate(batches)
    assert sorted(flat) == list(range(7))
    assert np.all(np.diff(lengths[flat]) >= 0)
    assert list(flat[:2]) == [3, 1]  # ties keep their order (stable)


def grouped(n: int = 1000, batch_size: int = 16, mega: int | None = 4, seed: int = 0):
    lengths = torch.from_numpy(
        np.random.default_rng(1).lognormal(4.08, 0.6, n).astype(np.int64).clip(29, 700)
    )
    plain = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    regrouped = length_grouped_order(lengths, batch_size, mega, torch.Generator().manual_seed(seed))
    return lengths, plain, regrouped


def mean_batch_longest(order: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> float:
    return float(np.mean([int(lengths[b].max()) for b in order.split(batch_size)]))


@pytest.mark.parametrize("mega", [4, None])
def test_grouping_by_length_is_a_permutation_with_shorter_batches_and_repeats_per_seed(mega):
    lengths, plain, regrouped = grouped(mega=mega)
    assert sorted(regrouped.tolist()) == list(range(1000))
    # the steps a batch pays for: far fewer when grouped (a plain shuffle's batch of 16 draws
    # reaches into the tail of the mix)
    assert mean_batch_longest(regrouped, lengths, 16) < 0.8 * mean_batch_longest(plain, lengths, 16)
    assert torch.equal(regrouped, grouped(mega=mega)[2])  # the same seed, the same order (a resume)
    assert not torch.equal(regrouped, grouped(mega=mega, seed=1)[2])
    assert lengths[regrouped[0]] == lengths.max()  # the longest sequence comes first
    # inside a mega-batch (4 x 16, or by default min(50, 1000 / 64) = 15 x 16) lengths fall, after
    # its first sequence (the one that mega-batch whose place the longest sequence took)
    mega_size = 16 * (mega or 15)
    for chunk in regrouped.split(mega_size):
        values = lengths[chunk[1:]]
        assert torch.all(values[:-1] >= values[1:])


def test_grouping_refuses_a_mega_batch_of_no_batches():
    with pytest.raises(ValueError, match="group_mega_batches"):
        length_grouped_order(torch.arange(10), 2, 0, torch.Generator())


def fold_run(group_by_length: bool, rank: int = 0, world_size: int = 1) -> FoldRun:
    cfg = OmegaConf.create({"data": {"group_by_length": group_by_length, "group_mega_batches": None}})
    context = DistributedContext(torch.device("cpu"), rank=rank, world_size=world_size)
    return FoldRun(cfg=cfg, fold=0, fold_dir=None, context=context, non_imu_columns=[])


def test_epoch_batches_without_grouping_are_the_plain_shuffle_of_every_earlier_run():
    run = fold_run(False)
    lengths = torch.randint(1, 100, (70,), generator=torch.Generator().manual_seed(0))
    order = run.epoch_order(70, 1234)
    batches = run.epoch_batches(lengths, 16, run.steps_per_epoch(70, 16), 1234)
    assert [len(b) for b in batches] == [16, 16, 16, 16, 6]
    assert torch.equal(torch.cat(batches), order)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_every_rank_gets_the_same_number_of_batches_and_together_every_sequence(group_by_length):
    lengths = torch.randint(1, 300, (203,), generator=torch.Generator().manual_seed(2))
    per_rank = []
    for rank in range(3):
        run = fold_run(group_by_length, rank, world_size=3)
        steps = run.steps_per_epoch(203, 8)
        per_rank.append(run.epoch_batches(lengths, 8, steps, epoch_seed=77))
    assert len({len(batches) for batches in per_rank}) == 1
    assert [len(b) for b in per_rank[0]] == [len(b) for b in per_rank[2]]
    seen = torch.cat([torch.cat(batches) for batches in per_rank])
    assert set(seen.tolist()) == set(range(203))
    assert len(seen) == 3 * math.ceil(203 / 3)  # the shards are padded like DistributedSampler's
    if group_by_length:  # the ranks' step-k batches come from one global batch of neighbours
        plain = fold_run(False, 0, world_size=3).epoch_batches(lengths, 8, len(per_rank[0]), epoch_seed=77)
        spread = [
            np.median([int(lengths[b].max() - lengths[b].min()) for b in r[:-1]])
            for r in (per_rank[0], plain)
        ]
        assert spread[0] < 0.75 * spread[1]


def test_noisebert_batches_cut_to_the_longest_sequence_give_the_padded_losses():
    from codes.noisebert.dataset import STEP_KEYS, CutCollate, NoiseBERTDataset
    from codes.noisebert.loss import masked_mse
    from codes.noisebert.model import NoiseBERT
    from tests.test_noisebert_model import tiny_model_cfg

    rng = np.random.default_rng(0)
    sequences = [rng.normal(size=(n, 4)).astype(np.float32) for n in (9, 23, 14)]
    dataset = NoiseBERTDataset(sequences, max_len=40, seed=3)
    items = [dataset[i] for i in range(3)]
    padded = torch.utils.data.default_collate(items)
    cut = CutCollate(BatchCut(40))(items)
    for key, value in cut.items():
        assert value.shape[1:2] == ((23,) if key in STEP_KEYS else padded[key].shape[1:2]), key
        assert torch.equal(value, padded[key][:, :23] if key in STEP_KEYS else padded[key]), key
    torch.manual_seed(0)
    model = NoiseBERT(4, tiny_model_cfg(), 40).eval()
    with torch.no_grad():
        outputs = [model(b["input"], b["padding_mask"], b["masked"]) for b in (padded, cut)]
    losses = [
        masked_mse(o["reconstruction"], b["target"], b["masked"])
        for o, b in zip(outputs, (padded, cut), strict=True)
    ]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    real = cut["padding_mask"]
    torch.testing.assert_close(
        outputs[0]["reconstruction"][:, :23][real], outputs[1]["reconstruction"][real], atol=1e-5, rtol=0
    )


def test_buckets_bound_the_number_of_compiled_graphs():
    """Static shapes (what CUDA graphs record): one graph per distinct batch length. Exact cuts of
    12 batches of lengths 1..64 compile about one graph per batch; 32-step buckets at most 2."""
    import torch._dynamo

    lengths = [3, 9, 17, 20, 29, 33, 40, 47, 51, 58, 61, 64]

    def n_graphs(cut: BatchCut) -> int:
        torch._dynamo.reset()
        layer = torch.nn.Linear(3, 2)
        compiled = torch.compile(
            lambda x, m: (layer(x) * m[..., None]).sum(1), backend="eager", dynamic=False
        )
        with torch._dynamo.config.patch(cache_size_limit=64, automatic_dynamic_shapes=False):
            torch._dynamo.utils.counters.clear()
            for length in lengths:
                features, mask = cut.cut_by_mask(padded_batch([length, 2], 64), (0, 1))
                compiled(features, mask)
            return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    assert n_graphs(BatchCut(64, 32)) <= math.ceil(64 / 32)
    assert n_graphs(BatchCut(64, 1)) == len(set(lengths))


def test_batch_inference_cut_to_each_batch_gives_the_padded_answers():
    """``EnsemblePredictor(pad_to_batch=True)`` (a run with ``data.pad_to_batch``): the sequences
    of a test frame batched in length order and cut, answered in the frame's order."""
    import polars as pl

    from tests.helpers import make_demographics, make_frame
    from tests.test_hostile_inputs import MAX_LEN, sensor_rows, tiny_predictor

    rng = np.random.default_rng(4)
    lengths = [1, 40, 5, MAX_LEN, 17, 2, 31, 9]
    frame = make_frame([(f"SEQ_{i:06d}", "SUBJ_000001", sensor_rows(n, rng)) for i, n in enumerate(lengths)])
    demographics = make_demographics(["SUBJ_000001"])
    padded = tiny_predictor(folds=2)
    table = padded.frame_table(frame, demographics)
    cut = tiny_predictor(folds=2)
    cut.pad_to_batch = True
    expected = padded.table_probabilities(table, batch_size=3)
    got = cut.table_probabilities(table, batch_size=3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    assert isinstance(frame, pl.DataFrame) and table.n_sequences == len(lengths)


@pytest.mark.parametrize(
    ("settings", "named"),
    [({"pad_to_batch": True, "length_bucket": 0}, "length_bucket"),
     ({"group_by_length": True, "group_mega_batches": 0}, "group_mega_batches"),
     ({"group_by_length": True, "group_mega_batches": "4"}, "group_mega_batches")],
)  # fmt: skip
def test_bad_batching_settings_are_refused_before_a_run_starts(settings, named):
    from codes.common.training import check_run_settings

    with pytest.raises(ValueError, match=named):
        check_run_settings(config(**settings))
    check_run_settings(config(pad_to_batch=True, group_by_length=True, group_mega_batches=None))
