"""Synthetic vibration noise for IMU sequences: short bursts of band-limited oscillation.

A vibration (a vehicle, a machine, a tremor) shakes every IMU axis at once for a while.
:func:`add_vibration_noise` draws between ``min_bursts`` and ``max_bursts`` bursts per sequence.
Each burst

- lasts ``length`` steps, drawn in ``min_burst_steps..max_burst_steps`` (``min_burst_seconds`` and
  ``max_burst_seconds`` times the sampling rate, rounded, at least 1: the same durations in
  seconds at 10 Hz and at 50 Hz), and starts at a random
  step such that the burst lies inside the sequence; a sequence shorter than the burst lies inside
  the burst at a random offset instead (the burst is clipped to the sequence);
- oscillates at one frequency drawn uniformly in ``[freq_low, freq_high] * sampling_rate_hz``
  (both fractions below 0.5, the Nyquist frequency), with a random phase per channel; with
  probability ``harmonic_prob`` its 2nd and 3rd harmonics are added at smaller amplitudes, each
  only when it lies below the Nyquist frequency (above, it would alias to another frequency);
- mixes in band-limited noise: white noise whose spectrum is cut to the same band with an FFT mask,
  scaled to the RMS of a unit sine; the burst's waveform is
  ``(1 - band_noise_fraction) * tone + band_noise_fraction * band_noise``;
- is shaped by a Tukey envelope (``envelope_taper`` = its tapered fraction; 1 = Hann) that is
  positive on exactly the burst's ``length`` steps and exactly 0 everywhere else;
- has amplitude ``A`` drawn in ``[min_amplitude, max_amplitude]`` in units of each channel's
  reference scale, ``max(std of the clean channel over the sequence, min_reference_std)``; each
  channel sees ``A`` times its own gain drawn in ``[min_channel_gain, 1]`` (the vibration projects
  differently onto each axis).

On channel ``c`` the added noise is
``sum_b A_b * gain_bc * scale_c * envelope_b(t) * waveform_bc(t)``.

Strength. ``strength[t] = sum_b A_b * envelope_b(t)``: the envelope amplitude of the added
oscillation at step ``t`` in reference-scale units (a channel with gain 1 oscillates about
``± strength * scale_c`` there). It is exactly 0 away from every burst, and there the noisy sequence
equals the clean one bit for bit. A step is noisy when ``strength > strength_threshold`` (strictly).

Everything random comes from the ``numpy.random.Generator`` passed in, so a generator state gives
one result. Work is vectorised over steps and channels; the only Python loop runs over bursts.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.signal.windows import tukey

from codes.common.augment import valid_quaternions
from codes.common.features import fill_within_segments, impossible_readings
from codes.common.schema import ACC_COLUMNS, ROT_COLUMNS
from codes.common.synthetic import quat_from_rotvec, quat_multiply, quat_to_matrix

__all__ = [
    "HARMONIC_AMPLITUDE_RANGES",
    "SequenceShaker",
    "VibrationBurst",
    "VibrationNoise",
    "VibrationNoiseConfig",
    "add_raw_vibration",
    "add_vibration_noise",
    "band_limited_noise",
    "burst_envelope",
    "burst_steps",
    "feature_strength",
    "seconds_to_steps",
    "shake_kept_rows",
]

# (low, high) amplitude of the 2nd and 3rd harmonic, relative to the fundamental
HARMONIC_AMPLITUDE_RANGES: tuple[tuple[float, float], ...] = ((0.2, 0.5), (0.1, 0.3))
NYQUIST_FRACTION = 0.5


@dataclass
class VibrationNoiseConfig:
    """How vibration bursts are drawn; frequencies are fractions of the sampling rate."""

    sampling_rate_hz: float = 10.0  # the competition's IMU rate (FeatureSettings.sampling_rate_hz)
    min_bursts: int = 0
    max_bursts: int = 3  # inclusive
    min_burst_seconds: float = 0.8  # x sampling_rate_hz = steps (8 at 10 Hz)
    max_burst_seconds: float = 4.0  # inclusive (40 steps at 10 Hz)
    freq_low: float = 0.15  # x sampling_rate_hz
    freq_high: float = 0.45  # x sampling_rate_hz, below the Nyquist fraction 0.5
    min_amplitude: float = 0.5  # x the channel's reference scale
    max_amplitude: float = 2.0
    harmonic_prob: float = 0.3  # chance that a burst carries its 2nd and 3rd harmonics
    band_noise_fraction: float = 0.3  # share of band-limited noise in the burst's waveform
    min_channel_gain: float = 0.3  # each channel's gain is drawn in [min_channel_gain, 1]
    envelope_taper: float = 0.5  # Tukey alpha of the burst envelope; 1.0 = Hann
    min_reference_std: float = 0.1  # floor on the per-channel std that amplitudes are measured in
    channels: list[int] | None = None  # channels that vibrate; None = all channels of the input
    strength_threshold: float = 0.1  # strength above which a step counts as noisy
    # raw injection (add_raw_vibration): the angular oscillation, in degrees, of a unit-strength
    # vibration on a channel of gain 1 (the wrist shakes angularly as well as linearly)
    rotation_deg_per_unit: float = 2.0

    def __post_init__(self) -> None:
        checks = [
            (self.sampling_rate_hz > 0, "sampling_rate_hz must be positive"),
            (0 <= self.min_bursts <= self.max_bursts, "need 0 <= min_bursts <= max_bursts"),
            (
                0 < self.min_burst_seconds <= self.max_burst_seconds,
                "need 0 < min_burst_seconds <= max_burst_seconds",
            ),
            (
                0 < self.freq_low <= self.freq_high < NYQUIST_FRACTION,
                "need 0 < freq_low <= freq_high < 0.5 (fractions of the sampling rate, below Nyquist)",
            ),
            (0 <= self.min_amplitude <= self.max_amplitude, "need 0 <= min_amplitude <= max_amplitude"),
            (0 <= self.harmonic_prob <= 1, "harmonic_prob must lie in [0, 1]"),
            (0 <= self.band_noise_fraction <= 1, "band_noise_fraction must lie in [0, 1]"),
            (0 < self.min_channel_gain <= 1, "min_channel_gain must lie in (0, 1]"),
            (0 <= self.envelope_taper <= 1, "envelope_taper must lie in [0, 1]"),
            (self.min_reference_std > 0, "min_reference_std must be positive"),
            (self.strength_threshold >= 0, "strength_threshold must be >= 0"),
            (self.rotation_deg_per_unit >= 0, "rotation_deg_per_unit must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"VibrationNoiseConfig: {message}; got {self}")
        if not all(np.isfinite([self.sampling_rate_hz, self.min_burst_seconds, self.max_burst_seconds])):
            raise ValueError(
                f"VibrationNoiseConfig: the rate and the burst durations must be finite; got {self}"
            )
        if self.channels is not None:
            channels = list(self.channels)
            if any(c < 0 for c in channels) or len(set(channels)) != len(channels):
                raise ValueError(f"channels must be distinct non-negative indices, got {channels}")


def seconds_to_steps(seconds: float, sampling_rate_hz: float) -> int:
    """A duration in seconds as a whole number of steps at ``sampling_rate_hz``: rounded, at least 1."""
    return max(1, round(seconds * sampling_rate_hz))


def burst_steps(cfg: VibrationNoiseConfig) -> tuple[int, int]:
    """``(min, max)`` burst lengths in steps at the config's sampling rate (8 and 40 at 10 Hz)."""
    low = seconds_to_steps(cfg.min_burst_seconds, cfg.sampling_rate_hz)
    return low, max(low, seconds_to_steps(cfg.max_burst_seconds, cfg.sampling_rate_hz))


@dataclass
class VibrationBurst:
    """One burst as drawn; ``start`` may be negative when the burst began before the sequence."""

    start: int  # first step of the whole burst (before clipping)
    length: int  # steps of the whole burst (before clipping)
    frequency_hz: float
    amplitude: float  # A, in reference-scale units
    has_harmonics: bool

    def clipped(self, n_steps: int) -> tuple[int, int]:
        """``(first, stop)`` steps of the burst inside a sequence of ``n_steps`` steps."""
        return max(self.start, 0), min(self.start + self.length, n_steps)


@dataclass
class VibrationNoise:
    """A noisy copy of a sequence and where, how strongly and at what frequency it vibrates."""

    noisy: np.ndarray  # (T, C) float32: clean + vibration
    strength: np.ndarray  # (T,) float32: sum over bursts of A_b * envelope_b(t); 0 away from bursts
    frequency: float  # Hz of the strongest burst (largest summed strength in the sequence); 0.0 = none
    strength_threshold: float
    bursts: list[VibrationBurst] = field(default_factory=list)

    @property
    def noisy_steps(self) -> np.ndarray:
        """(T,) bool: ``strength > strength_threshold``."""
        return self.strength > self.strength_threshold


def burst_envelope(length: int, taper: float) -> np.ndarray:
    """(length,) Tukey window, positive on all ``length`` steps (the zero end points cut off)."""
    return tukey(length + 2, alpha=taper)[1:-1]


def band_limited_noise(
    n_steps: int, n_channels: int, band: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """(n_steps, n_channels) white noise with only the frequencies in ``band`` (fractions of fs).

    Each channel is scaled to the RMS of a unit sine (1/sqrt(2)); a band that holds no FFT bin
    of an ``n_steps``-long signal gives zeros.
    """
    white = rng.standard_normal((n_steps, n_channels))
    spectrum = np.fft.rfft(white, axis=0)  # (n_steps // 2 + 1, C)
    frequencies = np.fft.rfftfreq(n_steps)  # cycles per step
    outside = (frequencies < band[0]) | (frequencies > band[1])
    spectrum[outside] = 0.0
    filtered = np.fft.irfft(spectrum, n=n_steps, axis=0)
    rms = np.sqrt(np.mean(filtered**2, axis=0))  # (C,)
    return np.divide(filtered, rms * np.sqrt(2.0), out=np.zeros_like(filtered), where=rms > 0)


def add_vibration_noise(
    x: np.ndarray,
    rng: np.random.Generator,
    cfg: VibrationNoiseConfig,
    reference_scale: np.ndarray | None = None,
) -> VibrationNoise:
    """Add vibration bursts to the ``cfg.channels`` of ``x`` ``(T, C)``; see the module docstring.

    ``x`` is not modified. ``T = 0`` gives an empty result with no burst. Amplitudes are measured
    in each channel's std floored at ``min_reference_std`` (the floor alone for a non-finite
    channel), or in ``reference_scale`` (one positive value per noised channel) when given.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be a (T, C) array, got shape {x.shape}")
    n_steps, n_channels = x.shape
    channels = np.arange(n_channels) if cfg.channels is None else np.asarray(cfg.channels, dtype=np.int64)
    if channels.size and channels.max() >= n_channels:
        raise ValueError(
            f"noise channels {cfg.channels} do not all exist in an input with {n_channels} channels"
        )
    noisy = x.astype(np.float32, copy=True)
    strength = np.zeros(n_steps, dtype=np.float64)
    if n_steps == 0:
        return VibrationNoise(noisy, strength.astype(np.float32), 0.0, cfg.strength_threshold)

    clean = x[:, channels].astype(np.float64)  # (T, K)
    if reference_scale is None:
        spread = clean.std(axis=0)  # (K,); a channel with a non-finite value falls back to the floor
        scale = np.where(
            np.isfinite(spread), np.maximum(spread, cfg.min_reference_std), cfg.min_reference_std
        )
    else:
        scale = np.asarray(reference_scale, dtype=np.float64)
        if scale.shape != (len(channels),) or not (np.isfinite(scale) & (scale >= 0)).all():
            raise ValueError(
                f"reference_scale must hold one finite value >= 0 per noised channel ({len(channels)}), "
                f"got {reference_scale}"
            )
    noise = np.zeros_like(clean)  # (T, K)
    band = (cfg.freq_low, cfg.freq_high)
    bursts: list[VibrationBurst] = []
    burst_weights: list[float] = []
    n_bursts = int(rng.integers(cfg.min_bursts, cfg.max_bursts + 1))
    min_length, max_length = burst_steps(cfg)
    for _ in range(n_bursts):
        length = int(rng.integers(min_length, max_length + 1))
        low_start, high_start = sorted((0, n_steps - length))
        start = int(rng.integers(low_start, high_start + 1))
        cycles_per_step = float(rng.uniform(*band))
        amplitude = float(rng.uniform(cfg.min_amplitude, cfg.max_amplitude))
        gains = rng.uniform(cfg.min_channel_gain, 1.0, size=len(channels))  # (K,)
        phases = rng.uniform(0.0, 2 * np.pi, size=len(channels))  # (K,)
        has_harmonics = bool(rng.random() < cfg.harmonic_prob)
        harmonic_amplitudes = [rng.uniform(low, high) for low, high in HARMONIC_AMPLITUDE_RANGES]
        band_noise = band_limited_noise(length, len(channels), band, rng)  # (length, K)

        burst = VibrationBurst(
            start, length, cycles_per_step * cfg.sampling_rate_hz, amplitude, has_harmonics
        )
        first, stop = burst.clipped(n_steps)
        inside = slice(first - start, stop - start)  # the burst's own steps inside the sequence
        steps = np.arange(first, stop)  # absolute steps of the burst inside the sequence
        angle = 2 * np.pi * cycles_per_step * steps[:, None] + phases[None, :]  # (S, K)
        tone = np.sin(angle)
        if has_harmonics:
            for order, relative in enumerate(harmonic_amplitudes, start=2):
                if order * cycles_per_step < NYQUIST_FRACTION:
                    tone += relative * np.sin(order * angle)
        waveform = (1 - cfg.band_noise_fraction) * tone + cfg.band_noise_fraction * band_noise[inside]
        envelope = amplitude * burst_envelope(length, cfg.envelope_taper)[inside]  # (S,)
        noise[first:stop] += envelope[:, None] * gains[None, :] * scale[None, :] * waveform
        strength[first:stop] += envelope
        bursts.append(burst)
        burst_weights.append(float(envelope.sum()))

    noisy[:, channels] = (clean + noise).astype(np.float32)
    strength = strength.astype(np.float32)
    frequency_hz = bursts[int(np.argmax(burst_weights))].frequency_hz if bursts else 0.0
    return VibrationNoise(noisy, strength, frequency_hz, cfg.strength_threshold, bursts)


def add_raw_vibration(
    sensors: np.ndarray, columns: Sequence[str], rng: np.random.Generator, cfg: VibrationNoiseConfig
) -> VibrationNoise:
    """Vibration bursts in one sequence's raw sensor rows ``(T, C)``, before any feature.

    ``columns`` names the columns of ``sensors`` (``FeatureSettings.sensor_columns``: acc in m/s^2,
    the quaternion rot_w..rot_z rotating device vectors into the world). The bursts are drawn as in
    :func:`add_vibration_noise` (same rules, same strength), on six channels at once: three of
    translational vibration, in units of each acc axis's std over the sequence (NaN ignored,
    floored at ``min_reference_std``), and three of angular vibration, a rotation vector ``r(t)``
    in units of ``rotation_deg_per_unit`` degrees. A shaken device then reads, at every step where
    the strength is above 0,

    - rotation ``q' = q * exp(r)`` (the device frame wobbles about its own axes), with w >= 0 as
      in the files;
    - acceleration ``acc' = R(exp(r))^T acc + a_vib``: the same specific force seen in the
      wobbled frame, plus the translational vibration. Gravity removed with ``q'`` leaves the
      linear acceleration and the vibration, no tilt leak.

    Rows where the strength is 0 are copied bit for bit; missing values stay missing (a missing
    quaternion is not rotated; an acc row missing one axis comes back missing all three, as the
    rotation mixes the axes: the features count such a row as missing either way); thermopiles
    and ToF are untouched. A step's features are unchanged where :func:`feature_strength` is 0.
    ``cfg.channels`` is not used.
    """
    sensors = np.asarray(sensors)
    if sensors.ndim != 2 or sensors.shape[1] != len(columns):
        raise ValueError(
            f"sensors must be (T, {len(columns)}) for the columns given, got shape {sensors.shape}"
        )
    missing = [c for c in (*ACC_COLUMNS, *ROT_COLUMNS) if c not in columns]
    if missing:
        raise ValueError(f"raw vibration needs the columns {missing}, which the sensor rows lack")
    acc_cols = [list(columns).index(c) for c in ACC_COLUMNS]
    rot_cols = [list(columns).index(c) for c in ROT_COLUMNS]
    acc = sensors[:, acc_cols].astype(np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN axis: the floor
        spread = np.nanstd(acc, axis=0) if len(acc) else np.zeros(3)
    acc_scale = np.where(
        np.isfinite(spread), np.maximum(spread, cfg.min_reference_std), cfg.min_reference_std
    )
    reference = np.concatenate([acc_scale, np.full(3, np.deg2rad(cfg.rotation_deg_per_unit))])
    drawn = add_vibration_noise(
        np.zeros((len(sensors), 6)), rng, replace(cfg, channels=None), reference_scale=reference
    )
    noisy = sensors.astype(np.float32, copy=True)
    shaken = np.flatnonzero(drawn.strength > 0)
    if shaken.size:
        vibration = drawn.noisy[shaken].astype(np.float64)  # (S, 6): a_vib, then the rotation vector
        wobble = quat_from_rotvec(vibration[:, 3:])  # (S, 4)
        # R(wobble)^T acc for row vectors: acc @ R(wobble)
        shaken_acc = np.einsum("sj,sjk->sk", acc[shaken], quat_to_matrix(wobble)) + vibration[:, :3]
        noisy[np.ix_(shaken, acc_cols)] = shaken_acc
        rot = sensors[np.ix_(shaken, rot_cols)].astype(np.float64)
        valid = valid_quaternions(rot)
        turned = quat_multiply(rot[valid], wobble[valid])
        turned = np.where(turned[:, :1] < 0, -turned, turned)  # w >= 0, the files' convention
        noisy[np.ix_(shaken[valid], rot_cols)] = turned
    return VibrationNoise(noisy, drawn.strength, drawn.frequency, cfg.strength_threshold, drawn.bursts)


def feature_strength(
    strength: np.ndarray, rows: Sequence[np.ndarray] = (), columns: Sequence[str] = ()
) -> np.ndarray:
    """(T,) the strength a step's derived features see.

    A step's features read rows ``t - 1`` and ``t`` (angular velocity, jerk): its strength is the
    larger of theirs. With ``rows`` (the clean and the shaken raw rows, ``columns`` naming their
    columns), a row whose acc or rotation is missing (the features' rule: non-finite, an
    all-zero quaternion, a physically impossible reading) takes the strength of the row the
    features fill it from (forward, then backward, within the sequence): a missing row right
    after a burst is filled with a shaken reading.
    """
    strength = np.asarray(strength)
    row_strength = strength.copy()
    if len(rows) and len(strength):
        columns = list(columns)
        bounds = np.array([0, len(strength)])
        for names in (ACC_COLUMNS, ROT_COLUMNS):
            positions = [columns.index(c) for c in names]
            read = np.ones(len(strength), dtype=bool)
            for values in rows:
                block = np.asarray(values)[:, positions]
                # an all-zero quaternion is an impossible reading too (norm 0)
                read &= np.isfinite(block).all(axis=1) & ~impossible_readings(block, names).any(axis=1)
            filled = fill_within_segments(strength[:, None], read, bounds)[:, 0]
            row_strength = np.maximum(row_strength, filled)
    out = row_strength.copy()
    out[1:] = np.maximum(row_strength[1:], row_strength[:-1])
    return out


def shake_kept_rows(
    rows: np.ndarray,
    columns: Sequence[str],
    rng: np.random.Generator,
    cfg: VibrationNoiseConfig,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """A raw vibration of a sequence's last ``max_len`` rows (the steps a model keeps):
    ``(shaken rows (T, C), feature strength (T,), frequency of the strongest burst in Hz)``, the
    strength 0 on the rows before them.

    The strength is what each step's features see (:func:`feature_strength`), so a step is shaken
    exactly when its features differ from the clean ones.
    """
    kept = slice(max(len(rows) - max_len, 0), len(rows))
    vibration = add_raw_vibration(rows[kept], columns, rng, cfg)
    noisy = rows.copy()
    noisy[kept] = vibration.noisy
    strength = np.zeros(len(rows), dtype=np.float32)
    strength[kept] = vibration.strength
    step_strength = np.zeros(len(rows), dtype=np.float32)
    step_strength[kept] = feature_strength(strength, (rows, noisy), columns)[kept]
    return noisy, step_strength, vibration.frequency


@dataclass
class SequenceShaker:
    """Shakes a share ``prob`` of sequences (fine-tuning with the CLS attention penalty): with
    1-3 bursts of the pretraining noise model by default (``min_bursts=1``: a shaken sequence has a
    burst). ``__call__(rows, rng)`` -> ``(rows, noisy steps (T,) bool)``; an unshaken sequence
    comes back as it was, with no noisy step. The draw order is fixed: one uniform number per
    sequence, then the vibration's own draws."""

    columns: tuple[str, ...]
    prob: float
    cfg: VibrationNoiseConfig
    max_len: int

    def __post_init__(self) -> None:
        if not 0 <= self.prob <= 1:
            raise ValueError(f"the share of shaken sequences must lie in [0, 1], got {self.prob}")

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.prob <= 0 or rng.random() >= self.prob:
            return rows, np.zeros(len(rows), dtype=bool)
        noisy, strength, _ = shake_kept_rows(rows, self.columns, rng, self.cfg, self.max_len)
        return noisy, strength > self.cfg.strength_threshold
