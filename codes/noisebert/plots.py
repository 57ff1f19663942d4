"""NoiseBERT run plots: the three loss curves, and one noisy sequence with the CLS attention."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from codes.common.plots import save_figure
from codes.noisebert.dataset import NoiseBERTDataset, expand_intervals


def plot_loss_curves(history: list[dict[str, float]], interpolation_mse: float, path: Path) -> Path:
    """Total, masked-MSE, CLS-objective and regularizer losses per epoch (solid: train, dashed: validation)."""
    figure, axes = plt.subplots(1, 5, figsize=(21, 3.8))
    epochs = [row["epoch"] for row in history]
    for axis, key, title in zip(
        axes,
        ("loss", "masked_mse", "cls_objective", "regularizer", "cls_mass_on_noisy"),
        (
            "total loss",
            "masked MSE",
            "CLS objective (clean summary MSE)",
            "penalty (before lambda)",
            "CLS attention mass on noisy steps",
        ),
        strict=True,
    ):
        # runs resumed from before the CLS objective have no such key in their first rows
        axis.plot(epochs, [row.get(f"train_{key}", float("nan")) for row in history], label="train")
        axis.plot(
            epochs, [row.get(f"valid_{key}", float("nan")) for row in history], "--", label="validation"
        )
        if key == "masked_mse":
            axis.axhline(interpolation_mse, color="grey", linestyle=":", label="linear interpolation")
        axis.set(xlabel="epoch", title=title)
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)
    return path


@torch.no_grad()
def plot_cls_attention(
    model, dataset: NoiseBERTDataset, device: torch.device, path: Path, search: int = 256
) -> Path:
    """A validation item (among the first ``search``) with many noisy steps but at least 40% clean
    ones: an IMU channel, noisy and clean, the noise intervals shaded, and the CLS attention (heads
    averaged) over it."""
    # the item with the most noisy steps among those that keep at least 40% of their steps clean
    scores = []
    for i in range(min(search, len(dataset))):
        item = dataset[i]
        noisy, real = int(item["noisy"].sum()), int(item["padding_mask"].sum())
        scores.append(noisy if noisy <= 0.6 * real else noisy - real)
    index = int(np.argmax(scores)) if scores else 0
    item = dataset[index]
    model.eval()
    batch = {k: v[None].to(device) for k, v in item.items()}
    out = model(batch["input"], batch["padding_mask"], batch["masked"])
    attention = out["cls_attention"][0, -1].mean(0).float().cpu().numpy()  # last chosen layer, heads averaged
    n = int(item["padding_mask"].sum())
    steps = np.arange(n)
    channel = dataset.noise_cfg.channels[0] if dataset.noise_cfg.channels else 0
    clean = item["target"][:n, channel].numpy()
    noisy_input = clean + (item["input"][:n, channel].numpy() - clean) * (~item["masked"][:n].numpy())
    in_interval = expand_intervals(item["noise_intervals"].numpy(), n, n)

    figure, axis = plt.subplots(figsize=(11, 4))
    for t in np.flatnonzero(in_interval):
        axis.axvspan(t - 0.5, t + 0.5, color="orange", alpha=0.18, lw=0)
    axis.plot(steps, noisy_input, color="tab:red", lw=1, label=f"noisy input (feature {channel})")
    axis.plot(steps, clean, color="black", lw=1.2, label="clean")
    masked = item["masked"][:n].numpy()
    axis.scatter(steps[masked], clean[masked], s=12, color="tab:blue", zorder=3, label="masked steps")
    axis.set(xlabel="step", ylabel="normalised value",
             title=f"validation item {index}: noise intervals shaded, {int(item['noisy'].sum())} noisy steps")  # fmt: skip
    twin = axis.twinx()
    twin.plot(steps, attention[:n], color="tab:green", lw=1.5, label="CLS attention")
    twin.set_ylabel("CLS attention (heads averaged)")
    handles = axis.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axis.legend(handles=handles, fontsize=7, loc="upper left")
    figure.tight_layout()
    save_figure(figure, path)
    return path
