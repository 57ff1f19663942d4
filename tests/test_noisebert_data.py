"""NoiseBERT data: the vibration generator and the masked pretraining items."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from codes.common.features import FeatureSettings
from codes.common.sequences import FeatureNormalizer, build_sequence_table, pad_sequences
from codes.noisebert.dataset import (
    MaskingConfig,
    NoiseBERTDataset,
    expand_intervals,
    interval_bounds,
    noisy_intervals,
    sample_span_mask,
)
from codes.noisebert.noise import VibrationNoiseConfig, add_vibration_noise
from tests.helpers import make_demographics, make_frame, rest_sensors

FS = 10.0
ONE_BURST = VibrationNoiseConfig(min_bursts=1, max_bursts=1)
NO_BURST = VibrationNoiseConfig(min_bursts=0, max_bursts=0)


def _clean(n_steps: int, n_channels: int = 7, seed: int = 0) -> np.ndarray:
    """A smooth random walk, normalised per channel: what a slow hand movement looks like."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(size=(n_steps, n_channels)), axis=0)
    walk = (walk - walk.mean(axis=0)) / (walk.std(axis=0) + 1e-6)
    return walk.astype(np.float32)


# ---------------------------------------------------------------- generator
def test_generator_is_deterministic_for_a_seed_and_differs_across_seeds():
    x = _clean(120)
    cfg = VibrationNoiseConfig(min_bursts=2, max_bursts=3)
    first = add_vibration_noise(x, np.random.default_rng(7), cfg)
    again = add_vibration_noise(x, np.random.default_rng(7), cfg)
    other = add_vibration_noise(x, np.random.default_rng(8), cfg)
    np.testing.assert_array_equal(first.noisy, again.noisy)
    np.testing.assert_array_equal(first.strength, again.strength)
    assert first.frequency == again.frequency
    assert not np.array_equal(first.noisy, other.noisy)
    assert first.noisy.dtype == np.float32 and first.strength.dtype == np.float32
    np.testing.assert_array_equal(x, _clean(120))  # the input is left as it was


@pytest.mark.parametrize("seed", range(8))
def test_strength_marks_the_bursts(seed):
    x = _clean(200, seed=seed)
    noise = add_vibration_noise(x, np.random.default_rng(seed), VibrationNoiseConfig(min_bursts=1))
    added = np.abs(noise.noisy - x).mean(axis=1)  # (T,)
    untouched = noise.strength == 0
    assert untouched.any() and noise.noisy_steps.any()
    # away from every burst the sequence is bit-for-bit the clean one
    np.testing.assert_array_equal(noise.noisy[untouched], x[untouched])
    # on noisy steps the vibration is large: a sizeable share of the channel's spread
    assert added[noise.noisy_steps].mean() > 0.1
    assert (added[noise.noisy_steps] > 0).all()
    # strength is the summed envelope of the bursts; each burst is positive on exactly its steps
    covered = np.zeros(len(x), dtype=bool)
    for burst in noise.bursts:
        first, stop = burst.clipped(len(x))
        covered[first:stop] = True
    np.testing.assert_array_equal(covered, ~untouched)
    assert noise.strength.max() <= sum(b.amplitude for b in noise.bursts) + 1e-5


def test_frequency_lies_in_the_band_and_is_zero_without_a_burst():
    cfg = VibrationNoiseConfig(min_bursts=1, max_bursts=3)
    x = _clean(80)
    for seed in range(30):
        noise = add_vibration_noise(x, np.random.default_rng(seed), cfg)
        assert cfg.freq_low * FS <= noise.frequency <= cfg.freq_high * FS
        assert noise.frequency in [b.frequency_hz for b in noise.bursts]
    silent = add_vibration_noise(x, np.random.default_rng(0), NO_BURST)
    assert silent.frequency == 0.0 and silent.bursts == []
    assert not silent.noisy_steps.any() and (silent.strength == 0).all()
    np.testing.assert_array_equal(silent.noisy, x)


@pytest.mark.parametrize(("harmonic_prob", "band_noise_fraction"), [(0.0, 0.0), (1.0, 0.3)])
def test_dominant_fft_frequency_of_a_long_burst_is_the_returned_frequency(harmonic_prob, band_noise_fraction):
    n_steps = 2048
    cfg = replace(
        ONE_BURST,
        min_burst_length=1500,
        max_burst_length=1500,
        harmonic_prob=harmonic_prob,
        band_noise_fraction=band_noise_fraction,
    )
    x = _clean(n_steps, n_channels=3)
    for seed in range(3):
        noise = add_vibration_noise(x, np.random.default_rng(seed), cfg)
        added = noise.noisy.astype(np.float64) - x  # (T, C)
        power = (np.abs(np.fft.rfft(added, axis=0)) ** 2).sum(axis=1)
        frequencies = np.fft.rfftfreq(n_steps, d=1 / FS)
        assert abs(frequencies[np.argmax(power)] - noise.frequency) <= FS / n_steps


def test_harmonics_above_nyquist_are_left_out():
    # a tone at 0.3 fs would put its 2nd harmonic at 0.6 fs, aliased to 0.4 fs
    cfg = replace(
        ONE_BURST,
        freq_low=0.3,
        freq_high=0.3,
        harmonic_prob=1.0,
        band_noise_fraction=0.0,
        min_burst_length=1000,
        max_burst_length=1000,
    )
    x = np.zeros((1024, 2), dtype=np.float32)
    noise = add_vibration_noise(x, np.random.default_rng(0), cfg)
    power = np.abs(np.fft.rfft(noise.noisy.astype(np.float64), axis=0)).sum(axis=1)
    frequencies = np.fft.rfftfreq(1024)
    assert power[np.abs(frequencies - 0.4) < 0.02].max() < 0.05 * power.max()


@pytest.mark.parametrize("n_steps", [0, 1, 5, 39])
def test_short_sequences_clip_the_bursts(n_steps):
    cfg = replace(ONE_BURST, min_burst_length=40, max_burst_length=40)
    x = _clean(max(n_steps, 1))[:n_steps]
    noise = add_vibration_noise(x, np.random.default_rng(3), cfg)
    assert noise.noisy.shape == x.shape and noise.strength.shape == (n_steps,)
    if n_steps:
        assert (noise.strength > 0).all()  # the sequence lies inside the burst
        assert np.isfinite(noise.noisy).all() and noise.frequency > 0


def test_only_the_given_channels_vibrate():
    x = _clean(100, n_channels=6)
    noise = add_vibration_noise(x, np.random.default_rng(0), replace(ONE_BURST, channels=[0, 2]))
    changed = (noise.noisy != x).any(axis=0)
    assert changed.tolist() == [True, False, True, False, False, False]
    with pytest.raises(ValueError, match="channels"):
        add_vibration_noise(x, np.random.default_rng(0), replace(ONE_BURST, channels=[9]))


def test_config_rejects_a_band_at_or_above_nyquist():
    with pytest.raises(ValueError, match="Nyquist"):
        VibrationNoiseConfig(freq_high=0.5)


# ---------------------------------------------------------------- masking helpers
def test_span_mask_has_the_exact_count_only_on_eligible_steps():
    rng = np.random.default_rng(0)
    for _ in range(50):
        eligible = rng.random(60) < 0.5
        n_masked = int(rng.integers(0, 40))
        mask = sample_span_mask(eligible, n_masked, 3.0, rng)
        assert mask.sum() == min(n_masked, eligible.sum())
        assert not (mask & ~eligible).any()


def test_spans_have_about_the_mean_length():
    rng = np.random.default_rng(0)
    eligible = np.ones(100_000, dtype=bool)
    mask = sample_span_mask(eligible, 3_000, 3.0, rng)  # sparse: spans rarely touch
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert 2.7 < mask.sum() / starts.sum() < 3.3


def test_intervals_follow_the_floor_rule_and_expand_back():
    np.testing.assert_array_equal(interval_bounds(10, 4), [0, 2, 5, 7, 10])
    noisy = np.zeros(12, dtype=bool)
    noisy[[1, 6]] = True  # intervals 0 and 2 of 10 real steps
    intervals = noisy_intervals(noisy, 10, 4)
    np.testing.assert_array_equal(intervals, [1, 0, 1, 0])
    expanded = expand_intervals(intervals, 10, 12)
    np.testing.assert_array_equal(np.flatnonzero(expanded), [0, 1, 5, 6])
    # fewer real steps than intervals: some intervals are empty, each step still has one
    np.testing.assert_array_equal(noisy_intervals(np.array([False, True, False]), 2, 4), [0, 0, 0, 1])


# ---------------------------------------------------------------- dataset
def _noisy_dataset(lengths=(3, 40, 90, 200, 700), max_len=128, **kwargs):
    sequences = [_clean(n, seed=i) for i, n in enumerate(lengths)]
    noise_cfg = kwargs.pop("noise_cfg", VibrationNoiseConfig(min_bursts=1, max_bursts=3))
    return NoiseBERTDataset(sequences, max_len, noise_cfg, MaskingConfig(num_intervals=16), **kwargs)


def _items(dataset, epochs=range(4)):
    for epoch in epochs:
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            yield {k: v.numpy() for k, v in dataset[i].items()}


def test_items_have_fixed_shapes_and_collate():
    dataset = _noisy_dataset()
    batch = next(iter(DataLoader(dataset, batch_size=5)))
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    assert shapes == {
        "input": (5, 128, 7),
        "target": (5, 128, 7),
        "masked": (5, 128),
        "noisy": (5, 128),
        "noise_strength": (5, 128),
        "noise_intervals": (5, 16),
        "interval_index": (5, 128),
        "frequency": (5,),
        "padding_mask": (5, 128),
    }
    assert batch["masked"].dtype == batch["noisy"].dtype == batch["padding_mask"].dtype == torch.bool


def test_masking_never_selects_noisy_or_padded_steps():
    n_masked_total = 0
    for item in _items(_noisy_dataset()):
        assert not (item["masked"] & item["noisy"]).any()
        assert not (item["masked"] & ~item["padding_mask"]).any()
        assert not (item["noisy"] & ~item["padding_mask"]).any()
        np.testing.assert_array_equal(item["noisy"], item["noise_strength"] > 0.1)
        eligible = item["padding_mask"] & ~item["noisy"]
        assert item["masked"].any() == eligible.any()  # at least one masked step when possible
        n_masked_total += int(item["masked"].sum())
    assert n_masked_total > 0


def test_masked_fraction_is_near_the_ratio_on_long_clean_sequences():
    sequences = [_clean(n, seed=n) for n in (300, 450, 600)]
    dataset = NoiseBERTDataset(sequences, 512, NO_BURST, MaskingConfig(mask_ratio=0.15))
    for item in _items(dataset, epochs=range(2)):
        n_real = item["padding_mask"].sum()
        assert abs(item["masked"].sum() / n_real - 0.15) <= 1 / n_real


def test_intervals_cover_every_noisy_step_and_only_noisy_intervals():
    for item in _items(_noisy_dataset()):
        n_real = int(item["padding_mask"].sum())
        intervals = item["noise_intervals"]
        covered = expand_intervals(intervals, n_real, len(item["noisy"]))
        assert not (item["noisy"] & ~covered).any()
        for k in range(len(intervals)):
            in_interval = item["interval_index"] == k
            assert intervals[k] == float(item["noisy"][in_interval].any())
        assert (item["interval_index"][~item["padding_mask"]] == -1).all()


def test_no_burst_gives_no_noisy_step_and_no_interval():
    for item in _items(_noisy_dataset(noise_cfg=NO_BURST)):
        assert not item["noisy"].any() and not item["noise_intervals"].any()
        assert (item["noise_strength"] == 0).all() and item["frequency"] == 0.0
    dataset = _noisy_dataset(add_noise=False)
    for item in _items(dataset, epochs=[0]):
        assert not item["noisy"].any() and item["frequency"] == 0.0


def test_single_step_and_long_sequences():
    long_sequence = _clean(300, seed=1)
    dataset = NoiseBERTDataset([_clean(1), long_sequence], 64, NO_BURST, MaskingConfig())
    single, long_item = dataset[0], dataset[1]
    assert single["padding_mask"].tolist() == [True] + [False] * 63
    assert single["masked"].tolist() == [True] + [False] * 63  # the one eligible step
    assert (single["input"] == 0).all()
    # a long sequence keeps its last max_len steps
    assert long_item["padding_mask"].all()
    np.testing.assert_array_equal(long_item["target"].numpy(), long_sequence[-64:])
    # with noise, a one-step sequence inside a burst is noisy and nothing is masked
    noisy_single = NoiseBERTDataset([_clean(1)], 8, replace(ONE_BURST, min_amplitude=1.0))[0]
    assert noisy_single["noisy"][0] and not noisy_single["masked"].any()
    assert noisy_single["noise_intervals"].sum() == 1


def test_items_are_deterministic_per_seed_epoch_and_index():
    first, second = _noisy_dataset(seed=3), _noisy_dataset(seed=3)
    first.set_epoch(2)
    second.set_epoch(2)
    for i in range(len(first)):
        a, b = first[i], second[i]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    first.set_epoch(3)
    assert any(not torch.equal(first[i]["input"], second[i]["input"]) for i in range(len(first)))
    assert any(not torch.equal(first[i]["masked"], second[i]["masked"]) for i in range(len(first)))
    other_seed = _noisy_dataset(seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed[2]["input"], second[2]["input"])
    # identical sequences at two indices get different noise
    twins = NoiseBERTDataset([_clean(100)] * 2, 128, ONE_BURST, MaskingConfig())
    assert not torch.equal(twins[0]["input"], twins[1]["input"])


def test_input_equals_target_at_unmasked_steps_without_noise():
    for item in _items(_noisy_dataset()):
        real = item["padding_mask"]
        quiet = real & ~item["masked"] & (item["noise_strength"] == 0)
        np.testing.assert_array_equal(item["input"][quiet], item["target"][quiet])
        assert (item["input"][item["masked"]] == 0).all()
        assert (item["input"][~real] == 0).all() and (item["target"][~real] == 0).all()
        assert (item["noise_strength"][~real] == 0).all()


def test_from_sequence_table_uses_the_normalised_features_and_vibrates_imu_only():
    rng = np.random.default_rng(0)
    sequences = []
    for i, n in enumerate((12, 5, 30)):
        sensors = rest_sensors(np.array([1.0, 0, 0, 0]), np.array([0, 0, 9.8]), n, rng)
        sensors[:, :3] += rng.normal(scale=0.3, size=(n, 3))
        sequences.append((f"SEQ_{i:06d}", "SUBJ_000000", sensors))
    frame = make_frame(sequences)  # test format: no labels
    table = build_sequence_table(frame, make_demographics(["SUBJ_000000"]), FeatureSettings())
    assert (table.labels == -1).all()
    normalizer = FeatureNormalizer().fit(table)
    dataset = NoiseBERTDataset.from_sequence_table(table, normalizer, 16, ONE_BURST)
    padded = pad_sequences(table, 16, normalizer.transform(table))
    imu = table.feature_groups["imu"]
    other = np.setdiff1d(np.arange(table.features.shape[1]), imu)
    for i in range(table.n_sequences):
        item = dataset[i]
        np.testing.assert_array_equal(item["target"].numpy(), padded.features[i])
        np.testing.assert_array_equal(item["padding_mask"].numpy(), padded.mask[i])
        unmasked = ~item["masked"].numpy()
        np.testing.assert_array_equal(
            item["input"].numpy()[unmasked][:, other], padded.features[i][unmasked][:, other]
        )
        assert item["noisy"].any()
