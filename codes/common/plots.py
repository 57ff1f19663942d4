"""PNG plots of a run: loss and score curves per fold, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import confusion_matrix

from codes.common.runs import atomic_path


def save_figure(figure: plt.Figure, path: Path) -> Path:
    """A PNG written atomically (a reader never sees half a file), then the figure closed."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    return path


def plot_fold_curves(histories: dict[int, list[dict[str, float]]], path: Path) -> Path:
    """Train/validation loss and validation score per epoch, one line per fold."""
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for fold, history in sorted(histories.items()):
        epochs = [row["epoch"] for row in history]
        line = loss_axis.plot(epochs, [row["train_loss"] for row in history], label=f"fold {fold} train")[0]
        loss_axis.plot(
            epochs,
            [row["valid_loss"] for row in history],
            "--",
            color=line.get_color(),
            label=f"fold {fold} valid",
        )
        score_axis.plot(
            epochs, [row["valid_score"] for row in history], color=line.get_color(), label=f"fold {fold}"
        )
        if "valid_score_imu_only" in history[0]:
            score_axis.plot(
                epochs, [row["valid_score_imu_only"] for row in history], ":", color=line.get_color()
            )
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: validation)")
    score_axis.set(xlabel="epoch", ylabel="competition score", title="validation score (dotted: IMU-only)")
    loss_axis.legend(fontsize=7)
    score_axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)
    return path


def plot_confusion_matrix(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str], path: Path
) -> Path:
    """Row-normalised confusion matrix over ``labels``."""
    matrix = confusion_matrix(y_true, y_pred, labels=list(labels)).astype(float)
    matrix /= np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(10, 9))
    image = axis.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    axis.set(xlabel="predicted", ylabel="true", title="confusion matrix (rows sum to 1)")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    save_figure(figure, path)
    return path
