"""The report's pictures and charts, as bytes to inline: matplotlib charts as PNG and the Fig.-4
overlays as JPEG, both byte-stable (the same store gives the same bytes, so DVC sees an unchanged
report as unchanged): matplotlib's PNG writer is given no "Software" metadata and Agg renders
deterministically; PIL writes no time stamps."""
from __future__ import annotations

import io
import json
import math
from typing import Any, Sequence

import numpy as np

# Colours: the ground truth green, the prediction red (as the paper's Fig. 4 draws them).
GT_COLOUR = (0, 220, 0)
PREDICTION_COLOUR = (255, 40, 40)
IGNORE_COLOUR = (160, 160, 160)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from cycler import cycler

    # tab20: 20 distinct colours, as many as a default pipeline has runs on one dataset.
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 7, "figure.dpi": 100,
                         "axes.prop_cycle": cycler(color=plt.get_cmap("tab20").colors)})
    return plt


def figure_png(fig) -> bytes:
    plt = _pyplot()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out.getvalue()


def _decode(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image)


def _jet(values: np.ndarray) -> np.ndarray:
    """An (H, W) uint8 map as (H, W, 3) uint8 colours of matplotlib's jet (as the protocol's
    visualisations colour CAMs)."""
    from matplotlib import colormaps

    return (colormaps["jet"](values.astype(np.float64) / 255.0)[..., :3] * 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay_jpeg(sample: dict[str, Any], scoremap_png: bytes | None, predicted_box: Sequence[int] | None,
                 threshold: float | None, display: int = 160) -> bytes:
    """One picture of paper Fig. 4: the test image as the protocol sees it (resized to the
    evaluation size, aspect ignored, spec §1.3), the score map blended over it in jet, the GT
    boxes (green; stored in the evaluation frame) or GT mask outline, and the prediction in red: the
    box that scored at the run's optimal threshold, or the outline of map >= threshold. Without
    a map, the image with its ground truth only."""
    from PIL import Image, ImageDraw

    size = int(sample["eval_size"])
    with Image.open(io.BytesIO(sample["thumbnail_png"])) as thumb:
        image = np.asarray(thumb.convert("RGB").resize((size, size), Image.BILINEAR)).astype(np.float64)
    if scoremap_png is not None:
        scoremap = _decode(scoremap_png)
        image = 0.5 * image + 0.5 * _jet(scoremap)
    picture = image.clip(0, 255).astype(np.uint8)
    if sample.get("gt_mask_png") is not None:
        gt = _decode(sample["gt_mask_png"])
        picture[_outline(gt == 1)] = GT_COLOUR
        picture[_outline(gt == 255)] = IGNORE_COLOUR
        if scoremap_png is not None and threshold is not None:
            picture[_outline(scoremap.astype(np.float64) / 255.0 >= threshold)] = PREDICTION_COLOUR
    scale = display / size
    canvas = Image.fromarray(picture).resize((display, display), Image.NEAREST if scale >= 1 else Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(display / 80))  # 2 px at the default 160: visible after JPEG
    if sample.get("gt_boxes"):
        for box in json.loads(sample["gt_boxes"]):  # already in the evaluation frame (wsolbench.samples)
            draw.rectangle([v * scale for v in box], outline=GT_COLOUR, width=width)
    if predicted_box is not None:
        draw.rectangle([v * scale for v in predicted_box], outline=PREDICTION_COLOUR, width=width)
    out = io.BytesIO()
    canvas.save(out, format="JPEG", quality=90, subsampling=0)  # 4:4:4: thin coloured lines stay coloured
    return out.getvalue()


def timing_chart(groups: list[dict[str, Any]], device: str) -> bytes:
    """Paper Table 4's shape as bars: train and test ms/image per method, one bar per UDA loss."""
    plt = _pyplot()
    methods = list(dict.fromkeys(g["method"] for g in groups))
    udas = list(dict.fromkeys(g["uda"] for g in groups))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / max(1, len(udas))
    for ax, kind in zip(axes, ("train", "test")):
        for k, uda in enumerate(udas):
            values = []
            for method in methods:
                match = [g for g in groups if g["method"] == method and g["uda"] == uda]
                values.append(match[0][kind] if match and match[0][kind] is not None else math.nan)
            positions = np.arange(len(methods)) + (k - (len(udas) - 1) / 2) * width
            ax.bar(positions, values, width, label="no UDA" if uda == "none" else uda.upper())
        ax.set_xticks(np.arange(len(methods)), methods)
        ax.set_ylabel(f"{kind} ms / image")
        ax.set_title(f"{kind} ({device})")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return figure_png(fig)


def study_charts(trials: list[dict[str, Any]], metric: str) -> bytes:
    """The λ study: the trials over (λ1, λ2) on log axes coloured by their val figure (pruned
    trials hollow, the best starred), and the optimisation history with the best so far."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    finished = [t for t in trials if t["value"] is not None and t["lambda1"] is not None]
    complete = [t for t in finished if t["state"] == "COMPLETE"]
    values = [t["value"] for t in finished]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if complete:
        scatter = left.scatter([t["lambda1"] for t in complete], [t["lambda2"] for t in complete],
                               c=[t["value"] for t in complete], cmap="viridis", vmin=low, vmax=high, s=40,
                               label="complete")
        fig.colorbar(scatter, ax=left, label=f"val {metric}")
    pruned = [t for t in finished if t["state"] == "PRUNED"]
    if pruned:
        left.scatter([t["lambda1"] for t in pruned], [t["lambda2"] for t in pruned], facecolors="none",
                     edgecolors="grey", s=40, label="pruned (last reported)")
    if complete:
        best = max(complete, key=lambda t: t["value"])
        left.scatter([best["lambda1"]], [best["lambda2"]], marker="*", s=220, c="red", label="best")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("λ1 (L_d weight)")
    left.set_ylabel("λ2 (L_u weight)")
    left.legend(loc="best")
    left.set_title("trials over the two weights")
    ordered = sorted(finished, key=lambda t: t["trial_number"])
    right.scatter([t["trial_number"] for t in ordered], [t["value"] for t in ordered],
                  c=["tab:blue" if t["state"] == "COMPLETE" else "grey" for t in ordered], s=25)
    best_so_far, running = [], -math.inf
    for t in ordered:
        if t["state"] == "COMPLETE":
            running = max(running, t["value"])
        best_so_far.append(running if running > -math.inf else math.nan)
    right.step([t["trial_number"] for t in ordered], best_so_far, where="post", color="red", label="best so far")
    right.set_xlabel("trial")
    right.set_ylabel(f"val {metric}")
    right.set_title("optimisation history (grey: pruned)")
    right.legend(loc="lower right")
    right.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def box_curve_chart(curves: list[tuple[str, dict[int, tuple[list[float], list[float]]]]], title: str) -> bytes:
    """Per-threshold box accuracy (MaxBoxAccV2's curves), one panel per IoU threshold, a line per run."""
    plt = _pyplot()
    ious = sorted({iou for _, by_iou in curves for iou in by_iou})
    fig, axes = plt.subplots(1, len(ious), figsize=(3.6 * len(ious), 3.2), squeeze=False)
    for ax, iou in zip(axes[0], ious):
        for label, by_iou in curves:
            if iou in by_iou:
                thresholds, values = by_iou[iou]
                ax.plot(thresholds, values, label=label, linewidth=1)
        ax.set_title(f"{title}: box accuracy at IoU {iou / 100:.1f}")
        ax.set_xlabel("score-map threshold")
        ax.set_ylabel("box accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return figure_png(fig)


def pr_curve_chart(curves: list[tuple[str, list[float], list[float]]], title: str) -> bytes:
    """Pixel precision-recall curves (PxAP is the area under each), a line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for label, recall, precision in curves:
        points = [(r, p) for r, p in zip(recall, precision) if p is not None]
        ax.plot([r for r, _ in points], [p for _, p in points], label=label, linewidth=1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: pixel precision-recall")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return figure_png(fig)


LOSS_TERMS = ("loss", "L_c", "lambda1_L_d", "lambda2_L_u")


def training_chart(runs: list[tuple[str, dict[str, list[tuple[int, float]]], str, list[tuple[int, float]]]],
                   columns: int = 4) -> bytes:
    """Small multiples, one panel per run: the train loss and, for DA-WSOL, its terms (L_c and the
    weighted L_d, L_u) per epoch, and the val headline metric on the right axis."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    rows = math.ceil(len(runs) / columns)
    fig, axes = plt.subplots(rows, min(columns, len(runs)), figsize=(3.3 * min(columns, len(runs)), 2.6 * rows),
                             squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, (label, terms, metric, val) in zip(axes.flat, runs):
        for term in LOSS_TERMS:
            if terms.get(term):
                epochs, values = zip(*terms[term])
                ax.plot(epochs, values, marker=".", linewidth=1, label=term)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if val:
            twin = ax.twinx()
            epochs, values = zip(*val)
            twin.plot(epochs, values, color="black", linestyle="--", marker="o", markersize=3, label=f"val {metric}")
            twin.set_ylabel(f"val {metric}", fontsize=7)
            twin.set_ylim(0, 100)
        ax.legend(loc="upper right", fontsize=6)
    fig.tight_layout()
    return figure_png(fig)


def benchmark_history_chart(series: dict[str, list[tuple[str, float]]]) -> bytes:
    """The gate's ratios across runs (oldest first), each benchmark relative to its first run: a
    change to the code shows as a step in one line, a noisy machine as wobble in all of them."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    labels: list[str] = []
    for name, points in sorted(series.items()):
        first = points[0][1]
        ax.plot(range(len(points)), [value / first for _, value in points], marker=".", linewidth=1, label=name)
        if len(points) > len(labels):
            labels = [label for label, _ in points]
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("ratio / its first run's")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=6, ncol=2)
    ax.set_title("timing benchmarks across gate runs (ratios to the calibration workload)")
    fig.tight_layout()
    return figure_png(fig)
