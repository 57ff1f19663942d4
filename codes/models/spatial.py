"""A per-step encoder of the ToF frames and thermopiles (``tof_mode="grid"`` features).

For every step of every sequence at once (no loop over time or sensors):

- each of the five 8x8 ToF frames (closeness pixels, ``features.tof_closeness``) goes through a
  small 2-D CNN whose weights all sensors share, plus a learned embedding of its sensor;
- next to the CNN's output, the frame's mean and largest closeness and its share of pixels with
  a reflection (``frame_statistics``); a LayerNorm, SiLU and a linear layer follow;
- the frames are pooled over the sensors: ``concat`` (default) keeps a slot per sensor, 0 where
  masked, mixed by a linear map without bias; ``mean`` takes the masked mean. A frame whose
  validity flag is 0 (not read, or blank: no reflection at any pixel) never reaches the CNN; a
  blank frame contributes a learned per-sensor "nothing in range" vector instead
  (``blank_embedding``), never distances;
- the five thermopiles (values and validity flags) go through a small MLP, its output gated by
  whether any thermopile was read at the step.

The result ``(B, T, out_dim)`` is exactly 0 at a step with no valid frame, no blank flag and no
thermopile, and at padded steps: a sequence without thermopile and ToF readings adds nothing,
whatever its (masked) pixel values hold. On the CPU the CNN runs on the valid frames of real
steps only, gathered into one batch, so its cost follows what was read; elsewhere (a GPU, or
under ``torch.compile``) it runs on every frame, with nothing read back to the host, and the
masked frames get weight 0 (the same outputs).
"""

from __future__ import annotations

import torch
from torch import nn

TOF_SIDE = 8  # each ToF sensor is an 8x8 grid, row-major from the top left
POOLINGS = ("concat", "mean")


def closeness_statistics(pixels: torch.Tensor) -> torch.Tensor:
    """``(..., 64)`` closeness pixels -> ``(..., 3)``: their mean, their largest value (the
    nearest reading) and the share of pixels with a reflection."""
    return torch.stack(
        [pixels.mean(dim=-1), pixels.amax(dim=-1), (pixels > 0).to(pixels.dtype).mean(dim=-1)], dim=-1
    )


class SpatialSensorEncoder(nn.Module):
    """``(features (B, T, F), mask (B, T))`` -> ``(B, T, out_dim)``; the columns come from
    ``features.feature_layout`` groups of ``tof_mode="grid"`` (``tof_grid``, ``tof_valid``,
    ``tof_blank``, and ``thm_values`` / ``thm_valid`` when thermopiles are used)."""

    def __init__(
        self,
        groups: dict[str, list[int]],
        tof_dim: int = 32,
        thm_dim: int = 16,
        channels: int = 8,
        blank_embedding: bool = True,
        pooling: str = "concat",
        frame_statistics: bool = True,
    ) -> None:
        super().__init__()
        missing = [g for g in ("tof_grid", "tof_valid", "tof_blank") if g not in groups]
        if missing:
            raise ValueError(
                f"the feature layout has no {missing} group(s): the spatial encoder needs data.tof_mode=grid"
            )
        self.n_sensors = len(groups["tof_valid"])
        if len(groups["tof_grid"]) != self.n_sensors * TOF_SIDE * TOF_SIDE:
            raise ValueError(f"expected {self.n_sensors} x 64 ToF pixels, got {len(groups['tof_grid'])}")
        for name in ("tof_grid", "tof_valid", "tof_blank", "thm_values", "thm_valid"):
            self.register_buffer(name, torch.tensor(groups.get(name, []), dtype=torch.long), persistent=False)
        self.use_thm = len(groups.get("thm_values", [])) > 0
        c = channels
        self.frame_cnn = nn.Sequential(  # (n, 1, 8, 8) -> (n, tof_dim)
            nn.Conv2d(1, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),  # 4x4
            nn.SiLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1),  # 2x2
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(4 * c * 4, tof_dim),
        )
        # the frame's mean and largest closeness and its share of pixels with a reflection, next
        # to what the CNN finds (the statistics exp020's summary features hold)
        self.statistics_projection = nn.Linear(3, tof_dim) if frame_statistics else None
        self.sensor_embedding = nn.Parameter(torch.zeros(self.n_sensors, tof_dim))
        nn.init.normal_(self.sensor_embedding, std=0.02)
        self.frame_mlp = nn.Sequential(nn.LayerNorm(tof_dim), nn.SiLU(), nn.Linear(tof_dim, tof_dim))
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        # concat: each sensor keeps its own slot (0 where masked), one linear map without bias
        self.sensor_mix = (
            nn.Linear(self.n_sensors * tof_dim, tof_dim, bias=False) if pooling == "concat" else None
        )
        self.blank_vectors = nn.Parameter(torch.zeros(self.n_sensors, tof_dim)) if blank_embedding else None
        n_thm = len(groups.get("thm_values", []))
        self.thm_mlp = (
            nn.Sequential(nn.Linear(2 * n_thm, thm_dim), nn.SiLU(), nn.Linear(thm_dim, thm_dim))
            if self.use_thm
            else None
        )
        self.out_dim = tof_dim + (thm_dim if self.use_thm else 0)

    def step_statistics(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, 4 S)``: per sensor the frame's mean and largest closeness, its share of pixels
        with a reflection and its blank flag; 0 for a masked frame and at padded steps (what
        exp020's summary features say, for the input projection: ``model.spatial.early_statistics``)."""
        batch, steps = features.shape[:2]
        real = mask[..., None].to(features.dtype)
        valid = features[..., self.tof_valid] * real  # (B, T, S)
        pixels = features[..., self.tof_grid].reshape(batch, steps, self.n_sensors, TOF_SIDE * TOF_SIDE)
        statistics = closeness_statistics(pixels) * valid[..., None]  # (B, T, S, 3)
        blank = features[..., self.tof_blank] * real
        return torch.cat([statistics, blank[..., None]], dim=-1).flatten(2)

    def gathers(self, features: torch.Tensor) -> bool:
        """Whether the CNN runs on the read frames only (gathered: the count is read back to the
        host): on the CPU, not compiling; elsewhere on every frame, as the encoder runs padded."""
        return features.device.type == "cpu" and not torch.compiler.is_compiling()

    def _embed_frames(self, frames: torch.Tensor, sensor: torch.Tensor) -> torch.Tensor:
        """``(n, 8, 8)`` frames and ``(n, S)`` one-hot sensors -> ``(n, D)``."""
        embedded = self.frame_cnn(frames[:, None]) + sensor @ self.sensor_embedding
        if self.statistics_projection is not None:
            embedded = embedded + self.statistics_projection(closeness_statistics(frames.flatten(1)))
        return self.frame_mlp(embedded)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, steps = features.shape[:2]
        real = mask[..., None].to(features.dtype)  # (B, T, 1)
        valid = features[..., self.tof_valid] * real  # (B, T, S)
        blank = features[..., self.tof_blank] * real if self.blank_vectors is not None else None
        frames = features[..., self.tof_grid].reshape(batch, steps, self.n_sensors, TOF_SIDE, TOF_SIDE)
        # (B, T, S, S) one-hot sensors: a matmul, whose gradient sums in a fixed order (an indexed
        # lookup's gradient accumulates over threads in any order, and runs would not repeat)
        sensor = torch.eye(self.n_sensors, device=features.device, dtype=frames.dtype).expand(
            batch, steps, -1, -1
        )
        read = valid > 0  # (B, T, S)
        if self.gathers(features):  # the CNN on the read frames of real steps only
            per_frame = self._embed_frames(frames[read], sensor[read])  # (n, D)
            per_frame = per_frame.new_zeros(batch, steps, self.n_sensors, per_frame.shape[-1]).index_put(
                (read,), per_frame
            )
        else:  # every frame, nothing read back to the host: masked ones get weight 0 below
            per_frame = self._embed_frames(frames.flatten(0, 2), sensor.flatten(0, 2))
            per_frame = per_frame.view(batch, steps, self.n_sensors, -1)
        per_frame = valid[..., None] * per_frame
        weights = valid
        if blank is not None:  # a blank frame's slot holds its sensor's "nothing in range" vector
            per_frame = per_frame + blank[..., None] * self.blank_vectors.to(per_frame.dtype)
            weights = weights + blank
        if self.sensor_mix is not None:
            pooled = self.sensor_mix(per_frame.flatten(2))  # (B, T, S x D) -> (B, T, D)
        else:  # the masked mean over the sensors
            pooled = per_frame.sum(dim=2) / weights.sum(dim=-1, keepdim=True).clamp(min=1.0)
        if not self.use_thm:
            return pooled
        thm_valid = features[..., self.thm_valid] * real  # (B, T, 5)
        thm_input = torch.cat([features[..., self.thm_values] * thm_valid, thm_valid], dim=-1)
        gate = thm_valid.amax(dim=-1, keepdim=True)  # 0 where no thermopile was read
        return torch.cat([pooled, self.thm_mlp(thm_input) * gate], dim=-1)
