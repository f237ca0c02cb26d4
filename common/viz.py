"""Plots for reports (matplotlib, headless)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import atomic, metrics  # noqa: E402


def _save(fig, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    fig.tight_layout()
    with atomic.path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def roc_plot(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path) -> pathlib.Path:
    """curves: (label, y_true, score) per line."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, y, s in curves:
        fpr, tpr, _ = metrics.roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.roc_auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def confusion_plot(c: dict, path, labels=("benign", "malignant")) -> pathlib.Path:
    m = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(m, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(m[i, j]),
                ha="center",
                va="center",
                color="white" if m[i, j] > m.max() / 2 else "black",
            )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix",
    )
    return _save(fig, path)


def reliability_plot(
    y: np.ndarray, p: np.ndarray | dict[str, np.ndarray], path, bins: int = 10
) -> pathlib.Path:
    """Reliability curve of P(malignant), or one curve per named series (e.g. raw and
    calibrated), each with its ECE in the legend."""
    series = p if isinstance(p, dict) else {"model": p}
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    for name, q in series.items():
        r = metrics.reliability(y, q, bins)
        ok = r["count"] > 0
        ece = metrics.expected_calibration_error(y, q, bins)
        ax.plot(
            r["mean_prediction"][ok],
            r["fraction_positive"][ok],
            "o-",
            label=f"{name} (ECE {ece:.3f})",
        )
    ax.set(
        xlabel="predicted P(malignant)",
        ylabel="observed fraction malignant",
        title="Reliability",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def series_plot(x: np.ndarray, series: dict[str, np.ndarray], path, title: str, xlabel: str):
    """One panel per named series over a shared x axis."""
    fig, axes = plt.subplots(len(series), 1, figsize=(6, 1.8 * len(series)), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, (name, y) in zip(axes, series.items()):
        ax.plot(x, y, lw=0.8)
        ax.set_ylabel(name)
    axes[0].set_title(title)
    axes[-1].set_xlabel(xlabel)
    return _save(fig, path)


def cam_overlays(rows: Sequence[dict], path) -> pathlib.Path:
    """rows: dicts with bmode, swe (H, W, 3) in [-1, 1], cam_bmode, cam_swe (h, w) in [0, 1],
    centre_bmode, centre_swe (row, col) on the H/2 grid, title."""
    fig, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows)), squeeze=False)
    for r, axrow in zip(rows, axes):
        h = r["bmode"].shape[0]
        for ax, img, cam, name in (
            (axrow[0], r["bmode"], r["cam_bmode"], "B-mode"),
            (axrow[1], r["swe"], r["cam_swe"], "SWE"),
        ):
            ax.imshow((img + 1) / 2)
            ax.imshow(cam, cmap="jet", alpha=0.4, extent=(-0.5, h - 0.5, h - 0.5, -0.5))
            ax.set_title(f"{name}: {r['title']}", fontsize=8)
            ax.axis("off")
        # Centres live on the H/2 MAF grid: x2 to image pixels.
        cb, cs = np.asarray(r["centre_bmode"]) * 2, np.asarray(r["centre_swe"]) * 2
        for ax in axrow:
            ax.plot(cb[1], cb[0], "w+", ms=12, mew=2, label="B-mode centre")
            ax.plot(cs[1], cs[0], "mx", ms=10, mew=2, label="SWE centre")
        axrow[1].annotate(
            "",
            xy=(cb[1], cb[0]),
            xytext=(cs[1], cs[0]),
            arrowprops=dict(arrowstyle="->", color="yellow"),
        )
        axrow[0].legend(loc="lower left", fontsize=6)
    return _save(fig, path)


def segmentation_batch(
    images: np.ndarray, labels: np.ndarray, masks: np.ndarray, modalities: Sequence[str], path
) -> pathlib.Path:
    """Middle slice (last spatial axis) of each sample: every modality, then the labels.

    images (B, H, W, D, M), labels (B, H, W, D), masks (B, M) presence."""
    b, m = images.shape[0], images.shape[-1]
    fig, axes = plt.subplots(b, m + 1, figsize=(2.2 * (m + 1), 2.2 * b), squeeze=False)
    z = images.shape[3] // 2
    for i in range(b):
        for k in range(m):
            ax = axes[i, k]
            ax.imshow(images[i, :, :, z, k].T, cmap="gray")
            ax.set_title(f"{modalities[k]}{'' if masks[i, k] else ' (missing)'}", fontsize=8)
            ax.axis("off")
        axes[i, m].imshow(
            labels[i, :, :, z].T, cmap="tab10", vmin=0, vmax=9, interpolation="nearest"
        )
        axes[i, m].set_title("labels", fontsize=8)
        axes[i, m].axis("off")
    return _save(fig, path)


# Colours of label values 1, 2, ... over a grey image (label 0 is transparent).
LABEL_COLOURS = (
    (0.95, 0.25, 0.2),
    (0.2, 0.8, 0.3),
    (1.0, 0.85, 0.1),
    (0.25, 0.55, 1.0),
    (0.85, 0.35, 0.9),
    (0.1, 0.9, 0.9),
)


def _label_rgba(labels: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros((*labels.shape, 4), np.float32)
    for value, colour in enumerate(LABEL_COLOURS, start=1):
        rgba[labels == value] = (*colour, alpha)
    return rgba


def label_overlays(
    image: np.ndarray,
    panels: Sequence[tuple[str, np.ndarray]],
    path,
    class_names: dict[int, str],
    ncols: int = 4,
    transpose: bool = True,
    title: str = "",
) -> pathlib.Path:
    """One grey `image` (H, W) under several label maps: panels of (title, labels (H, W) int).
    `transpose` draws axis 0 horizontally (as `segmentation_batch`)."""
    show = (lambda a: np.swapaxes(a, 0, 1)) if transpose else (lambda a: a)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.2 * ncols, 2.2 * nrows + 0.5), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, labels) in zip(axes.flat, panels):
        ax.imshow(show(image), cmap="gray")
        ax.imshow(show(_label_rgba(np.asarray(labels), 0.5)), interpolation="nearest")
        ax.set_title(name, fontsize=7)
    handles = [
        matplotlib.patches.Patch(color=LABEL_COLOURS[v - 1], label=f"{v} {n}")
        for v, n in sorted(class_names.items())
        if 1 <= v <= len(LABEL_COLOURS)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    with atomic.path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return pathlib.Path(path)


def attention_grid(
    maps: np.ndarray,
    row_titles: Sequence[str],
    col_titles: Sequence[str],
    present: np.ndarray,
    path,
    transpose: bool = True,
    title: str = "",
) -> pathlib.Path:
    """Attention weights in [0, 1]: maps (R, M, H, W), row r a condition (e.g. a modality
    combination), column m a modality; present (R, M) bool marks absent ones in the titles."""
    show = (lambda a: np.swapaxes(a, 0, 1)) if transpose else (lambda a: a)
    r, m = maps.shape[:2]
    fig, axes = plt.subplots(
        r, m, figsize=(1.3 * m + 1.6, 1.3 * r + 0.5), squeeze=False, layout="constrained"
    )
    im = None
    for i in range(r):
        for k in range(m):
            ax = axes[i, k]
            im = ax.imshow(show(maps[i, k]), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[k], fontsize=8)
            if not present[i, k]:
                ax.text(
                    0.5,
                    0.5,
                    "missing",
                    color="w",
                    ha="center",
                    va="center",
                    fontsize=7,
                    transform=ax.transAxes,
                )
        axes[i, 0].set_ylabel(row_titles[i], fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=min(1.0, 4.0 / r), label="weight")
    if title:
        fig.suptitle(title, fontsize=9)
    with atomic.path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return pathlib.Path(path)
