"""The evaluator: score maps and metadata in, the protocol's numbers and curves out (spec §2).

Pure: it reads maps through a loader function and the split's metadata, and returns results; it
writes nothing. Training, the CLI and the tests all call `evaluate_split`.

Box metrics (spec §2.2-2.4): per threshold tau_k the map is quantised (uint8(S*255)), binarised at
int(tau_k * max) and its contours' boxes are compared with the ground-truth boxes (max over GT).
  MaxBoxAcc    the largest contour only, IoU 50 (CVPR'20)
  MaxBoxAccV2  all contours, the mean of IoU 30/50/70, each with its own best threshold
  GT-known Loc the IoU-50 term of V2 (all contours), whichever of the two is asked for
  Top-1 Loc    as GT-known, counting only images whose predicted class is right (own threshold)
Mask metrics (spec §2.5-2.6): PxAP (area under the pixel precision-recall curve, 1002 histogram
bins) and pIoU (the dataset-level peak IoU), ignore pixels excluded.

Two engines compute the per-threshold boxes: "definition" runs OpenCV at every threshold, exactly
as the spec words it; "fast" (the default) gets the same boxes from one sweep over the map
(wsolbench.contour_sweep) and falls back to the definition at the few levels the sweep cannot
decide. Both give identical numbers; tests and benchmarks/ hold them to that.
"""
from __future__ import annotations

import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
from wsolbench import kernels
from wsolbench.contour_sweep import Workspace, quantize_into, sweep_levels
from wsolbench.datasets.masks import load_gt_mask
from wsolbench.datasets.metadata import SplitMetadata
from wsolbench.errors import InputError, WsolbenchError

IOU_THRESHOLDS = (30, 50, 70)
EVAL_SIZE = (224, 224)


# ---------------------------------------------------------------------------------------------
# Definitions (spec §2.1-2.3)
# ---------------------------------------------------------------------------------------------

def score_thresholds(cam_curve_interval: float = 0.001) -> np.ndarray:
    """Spec §2.1: np.arange(0, 1, interval), i.e. k * interval in float64, not decimal k/1000."""
    if not (0 < cam_curve_interval < 1):
        raise WsolbenchError(f"cam_curve_interval must lie in (0, 1), got {cam_curve_interval}")
    return np.arange(0, 1, cam_curve_interval)


def rescale_box(box: Sequence[int], image_size: tuple[int, int], target_size: tuple[int, int]) -> tuple[int, ...]:
    """Spec §1.4: int(x * W' / W) per coordinate, multiplying first; sizes are (width, height)."""
    (width, height), (new_width, new_height) = image_size, target_size
    x0, y0, x1, y1 = box
    return (int(x0 * new_width / width), int(y0 * new_height / height),
            int(x1 * new_width / width), int(y1 * new_height / height))


def multiple_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Spec §2.3: IoU matrix of inclusive integer boxes (areas with +1); 0 where degenerate."""
    boxes_a = np.asarray(boxes_a, dtype=np.int64).reshape(-1, 4)
    boxes_b = np.asarray(boxes_b, dtype=np.int64).reshape(-1, 4)
    for boxes in (boxes_a, boxes_b):
        if (boxes < 0).any() or (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise ValueError(f"boxes must be (x0, y0, x1, y1) with 0 <= x0 <= x1, 0 <= y0 <= y1: {boxes.tolist()}")
    a = boxes_a[:, None, :]
    b = boxes_b[None, :, :]
    inter = (np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
             * np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1))
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    denominator = area_a + area_b - inter
    degenerate = denominator <= 0
    ious = inter / np.where(degenerate, 1, denominator)
    ious[degenerate] = 0.0
    return ious


def quantize(scoremap: np.ndarray) -> np.ndarray:
    """Spec §2.2 step 1: uint8(S * 255), truncating toward zero."""
    return (scoremap * 255).astype(np.uint8)


def threshold_levels(thresholds: np.ndarray, quantized_max: int) -> np.ndarray:
    """Spec §2.2 step 2: the integer level int(tau * max(U)) of every threshold."""
    return (thresholds * np.float64(quantized_max)).astype(np.int64)


def contour_boxes(quantized: np.ndarray, level: int, multi_contour: bool) -> np.ndarray:
    """Spec §2.2 steps 3-7 at one level, with OpenCV itself: the boxes of `quantized > level`."""
    import cv2  # here, not at module level: the fast engine's process never needs OpenCV unless it falls back

    height, width = quantized.shape
    _, binary = cv2.threshold(quantized, level, 255, cv2.THRESH_BINARY)  # strict >
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]  # OpenCV 3 and 4+
    if len(contours) == 0:
        return np.zeros((1, 4), dtype=np.int64)
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]  # ties: the first in findContours order
    boxes = np.empty((len(contours), 4), dtype=np.int64)
    for i, contour in enumerate(contours):
        x, y, w, h = cv2.boundingRect(contour)
        # x + w is one past the last pixel, clipped and then used as inclusive (spec §2.2, §8.3).
        boxes[i] = (x, y, min(x + w, width - 1), min(y + h, height - 1))
    return boxes


# ---------------------------------------------------------------------------------------------
# Per image: best IoU at every threshold
# ---------------------------------------------------------------------------------------------

def below_floor(best: np.ndarray, floor: float) -> np.ndarray:
    """Both engines report a best IoU below `floor` as -1: only comparisons at or above it count."""
    return np.where(best >= floor, best, -1.0) if floor > 0 else best


def best_ious_definition(scoremap: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray,
                         largest: bool = True, floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold, the best IoU over GT of (all contours, the largest contour), by definition.

    Without `largest` the second array is all NaN (only V2 boxes are needed). Bests below `floor`
    (the smallest IoU threshold the caller compares with) are reported as -1.
    """
    quantized = quantize(scoremap)
    levels = threshold_levels(thresholds, int(quantized.max()))
    best_all = np.empty(len(thresholds))
    best_largest = np.full(len(thresholds), np.nan)
    for k, level in enumerate(levels):
        best_all[k] = multiple_iou(contour_boxes(quantized, level, True), gt_boxes).max()
        if largest:
            best_largest[k] = multiple_iou(contour_boxes(quantized, level, False), gt_boxes).max()
    return below_floor(best_all, floor), best_largest


_workspaces = threading.local()


def best_ious_fast(scoremap: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray,
                   largest: bool = True, floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The same numbers as `best_ious_definition`, from one sweep over the map."""
    workspace = getattr(_workspaces, "current", None)
    if workspace is None or workspace.shape != scoremap.shape:
        workspace = _workspaces.current = Workspace(*scoremap.shape)
    quantized = workspace.quantized
    quantized_max = quantize_into(np.ascontiguousarray(scoremap, dtype=np.float64), quantized)
    levels = threshold_levels(thresholds, quantized_max)
    gt_boxes = np.ascontiguousarray(gt_boxes, dtype=np.int64)
    if quantized_max == 0:  # nothing above any level: the single box [0, 0, 0, 0] everywhere
        empty = multiple_iou(np.zeros((1, 4)), gt_boxes).max()
        return (below_floor(np.full(len(thresholds), empty), floor),
                np.full(len(thresholds), empty if largest else np.nan))
    distinct, slot_of_threshold = np.unique(levels, return_inverse=True)
    level_slot = np.full(256, -1, dtype=np.int64)
    level_slot[distinct] = np.arange(len(distinct))
    best_all, best_largest = sweep_levels(quantized, level_slot, gt_boxes, largest, workspace, floor)
    best_all = below_floor(best_all, floor)
    if not largest:
        return best_all[slot_of_threshold], best_largest[slot_of_threshold]
    for slot in np.flatnonzero(np.isnan(best_largest)):  # undecided by the sweep: ask OpenCV
        boxes = contour_boxes(quantized, int(distinct[slot]), multi_contour=False)
        best_largest[slot] = multiple_iou(boxes, gt_boxes).max()
    return best_all[slot_of_threshold], best_largest[slot_of_threshold]


ENGINES = {"fast": best_ious_fast, "definition": best_ious_definition}


# ---------------------------------------------------------------------------------------------
# Mask histograms (spec §2.5)
# ---------------------------------------------------------------------------------------------

def histogram_edges(thresholds: np.ndarray) -> np.ndarray:
    """Spec §2.5: the thresholds, then 1, 2, 3 (the last bin closed, numpy.histogram style)."""
    return np.append(thresholds, [1.0, 2.0, 3.0])


@kernels.kernel("void(f8[:, ::1], u1[:, ::1], f8[::1], f8, i8[::1], i8[::1])")
def accumulate_mask_histograms(scoremap, gt_mask, edges, interval, positive, negative):
    """Add the map's scores to the foreground (1) and background (0) histograms; 255 is ignored.

    Bin b holds edges[b] <= s < edges[b+1] (the last bin also s == edges[-1]), as numpy.histogram;
    the guess s / interval is corrected against the exact float edges.
    """
    last = edges.shape[0] - 2
    flat_scores = scoremap.ravel()
    flat_mask = gt_mask.ravel()
    for p in range(flat_scores.shape[0]):
        label = flat_mask[p]
        if label != 1 and label != 0:
            continue
        s = flat_scores[p]
        b = int(s / interval)
        if b > last:
            b = last
        while b > 0 and s < edges[b]:
            b -= 1
        while b < last and s >= edges[b + 1]:
            b += 1
        if label == 1:
            positive[b] += 1
        else:
            negative[b] += 1


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclass
class BoxResult:
    """Box metrics of a split, in percent, with the per-threshold curves behind them.

    `headline` is the metric asked for: "v2" (MaxBoxAccV2) or "v1" (MaxBoxAcc). The V2 curves are
    always there (GT-known and Top-1 Loc use V2 boxes); the v1 curve when it was computed.
    """

    dataset: str
    split: str
    num_images: int
    cam_curve_interval: float
    headline: str
    thresholds: np.ndarray
    v2_acc: dict[int, np.ndarray]          # all contours, per IoU threshold
    v1_acc: np.ndarray | None              # the largest contour, IoU 50
    gt_known_acc: np.ndarray               # V2 boxes, IoU 50
    top1_loc_acc: dict[int, np.ndarray] | None = None  # V2 boxes, class right
    top1_cls: float | None = None

    @property
    def multi_contour(self) -> bool:
        return self.headline == "v2"

    @property
    def metric(self) -> str:
        return "MaxBoxAccV2" if self.multi_contour else "MaxBoxAcc"

    @property
    def box_acc(self) -> dict[int, np.ndarray]:
        """The headline metric's curves, per IoU threshold."""
        return self.v2_acc if self.multi_contour else {50: self.v1_acc}

    @property
    def per_iou(self) -> dict[int, float]:
        return {iou: float(acc.max()) for iou, acc in self.box_acc.items()}

    @property
    def value(self) -> float:
        return float(np.mean(list(self.per_iou.values())))

    @property
    def max_box_acc_v2(self) -> float:
        return float(np.mean([acc.max() for acc in self.v2_acc.values()]))

    @property
    def max_box_acc(self) -> float | None:
        return None if self.v1_acc is None else float(self.v1_acc.max())

    def best_threshold(self, curve: np.ndarray) -> float:
        return float(self.thresholds[int(np.argmax(curve))])  # the first best, as np.argmax

    def to_dict(self) -> dict:
        out: dict = {"dataset": self.dataset, "split": self.split, "num_images": self.num_images,
                     "cam_curve_interval": self.cam_curve_interval, "metric": self.metric,
                     self.metric: self.value,
                     "per_iou": {str(iou): v for iou, v in self.per_iou.items()},
                     "best_threshold": {str(iou): self.best_threshold(acc) for iou, acc in self.box_acc.items()},
                     "GT-known Loc": float(self.gt_known_acc.max()),
                     "GT-known Loc threshold": self.best_threshold(self.gt_known_acc)}
        if self.top1_loc_acc is not None:
            out["Top-1 Loc"] = float(self.top1_loc_acc[50].max())
            out["Top-1 Loc threshold"] = self.best_threshold(self.top1_loc_acc[50])
        if self.top1_cls is not None:
            out["Top-1 Cls"] = self.top1_cls
        return out

    def curves(self) -> dict:
        out = {"kind": "boxes", "metric": self.metric, "thresholds": self.thresholds.tolist(),
               "box_acc_v2": {str(iou): acc.tolist() for iou, acc in self.v2_acc.items()},
               "gt_known_acc": self.gt_known_acc.tolist()}
        if self.v1_acc is not None:
            out["box_acc_v1"] = {"50": self.v1_acc.tolist()}
        if self.top1_loc_acc is not None:
            out["top1_loc_acc"] = {str(iou): acc.tolist() for iou, acc in self.top1_loc_acc.items()}
        return out


@dataclass
class MaskResult:
    """PxAP and pIoU of a split, in percent, with the precision-recall curve behind them."""

    dataset: str
    split: str
    num_images: int
    cam_curve_interval: float
    edges: np.ndarray
    positive_hist: np.ndarray
    negative_hist: np.ndarray
    top1_cls: float | None = None
    tp: np.ndarray = field(init=False)
    fp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        # Spec §2.5: reversed cumulative sums; index j counts scores >= edges[len - 2 - j].
        self.tp = self.positive_hist[::-1].cumsum().astype(np.float64)
        self.fp = self.negative_hist[::-1].cumsum().astype(np.float64)
        positives = float(self.positive_hist.sum())
        self.fn = positives - self.tp
        if positives <= 0:
            raise WsolbenchError(f"{self.dataset}/{self.split}: no positive ground truth in the split "
                                 f"(every mask is empty), so PxAP and pIoU are undefined")
        if (self.tp + self.fp <= 0).all():
            raise WsolbenchError(f"{self.dataset}/{self.split}: no positive prediction at any threshold")

    @property
    def precision(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.tp / (self.tp + self.fp)

    @property
    def recall(self) -> np.ndarray:
        return self.tp / (self.tp + self.fn)

    @property
    def pxap(self) -> float:
        precision = self.precision[1:]
        area = precision * np.diff(self.recall)
        return float(area[~np.isnan(precision)].sum() * 100)

    @property
    def iou(self) -> np.ndarray:
        return 100 * self.tp / (self.tp + self.fp + self.fn)

    @property
    def piou(self) -> float:
        return float(self.iou.max())

    @property
    def curve_thresholds(self) -> np.ndarray:
        """The score threshold of each index j of tp/fp: index j counts scores >= this."""
        return self.edges[::-1][1:]

    def to_dict(self) -> dict:
        out = {"dataset": self.dataset, "split": self.split, "num_images": self.num_images,
               "cam_curve_interval": self.cam_curve_interval, "metric": "PxAP",
               "PxAP": self.pxap, "pIoU": self.piou,
               "pIoU threshold": float(self.curve_thresholds[int(np.argmax(self.iou))])}
        if self.top1_cls is not None:
            out["Top-1 Cls"] = self.top1_cls
        return out

    def curves(self) -> dict:
        precision = self.precision
        return {"kind": "masks", "thresholds": self.curve_thresholds.tolist(),
                "precision": [None if math.isnan(p) else float(p) for p in precision],
                "recall": self.recall.tolist(), "iou": self.iou.tolist()}


# ---------------------------------------------------------------------------------------------
# Evaluating a split
# ---------------------------------------------------------------------------------------------

def read_predictions(path: str | os.PathLike, metadata: SplitMetadata) -> dict[str, int]:
    """A CSV of `image_id,class` lines (a header line `image_id,class` is allowed)."""
    path = Path(path)
    predictions: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise InputError(path, f"cannot read predictions: {error.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.strip().replace(" ", "") in ("image_id,class", "image_id,prediction")):
            continue
        fields = line.split(",")
        if len(fields) != 2:
            raise InputError(path, f"expected 2 fields (image_id,class), found {len(fields)}", number)
        image_id, predicted = fields[0], fields[1].strip()
        if image_id not in metadata.class_labels:
            raise InputError(path, f"image id {image_id!r} is not in {metadata.dataset}/{metadata.split}", number)
        try:
            predictions[image_id] = int(predicted)
        except ValueError:
            raise InputError(path, f"class {predicted!r} is not an integer", number) from None
    for image_id in metadata.image_ids:
        if image_id not in predictions:
            raise InputError(path, f"no prediction for image id {image_id!r}")
    return predictions


ScoremapLoader = Callable[[str], np.ndarray]


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for begin in range(0, len(items), size):
        yield items[begin:begin + size]


class SplitEvaluator:
    """Accumulates the maps of one split, in any order and from any number of threads.

    `add(image_id, scoremap, predicted_class)` does the per-map work (the kernels release the
    GIL, so threads scale) and adds integer counts, so results do not depend on the order or
    the number of threads. `result()` gives the split's BoxResult or MaskResult.
    """

    def __init__(self, metadata: SplitMetadata, *, cam_curve_interval: float = 0.001,
                 box_metric: Literal["v1", "v2"] = "v2", mask_root: str | os.PathLike | None = None,
                 iou_thresholds: Sequence[int] = IOU_THRESHOLDS, image_size: tuple[int, int] = EVAL_SIZE,
                 engine: str = "fast", with_v1: bool = False):
        """`box_metric` is the headline; V2 curves are always computed, v1 when it is the headline
        or `with_v1` (it costs a little more: the largest contour's area)."""
        if metadata.localization == "none":
            raise WsolbenchError(f"{metadata.file('localization')}: empty, so {metadata.dataset}/{metadata.split} "
                                 f"has no boxes or masks to evaluate against")
        if metadata.localization == "masks":
            if mask_root is None:
                raise WsolbenchError(f"{metadata.dataset}/{metadata.split} has masks: pass --mask-root, the folder "
                                     f"the mask paths in {metadata.file('localization')} are relative to")
            metadata.check_mask_files(mask_root)
        if engine not in ENGINES:
            raise WsolbenchError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
        if box_metric not in ("v1", "v2"):
            raise WsolbenchError(f"unknown box metric {box_metric!r} (v1 or v2)")
        self.metadata = metadata
        self.cam_curve_interval = cam_curve_interval
        self.thresholds = score_thresholds(cam_curve_interval)
        self.headline = box_metric
        self.with_v1 = with_v1 or box_metric == "v1"
        self.iou_thresholds = tuple(iou_thresholds)
        # Every comparison is best >= delta / 100 (GT-known: 50), so smaller bests need not be exact.
        self.iou_floor = min(self.iou_thresholds + (50,)) / 100
        self.mask_root = mask_root
        self.image_size = tuple(image_size)
        self.best_ious = ENGINES[engine]
        self.edges = histogram_edges(self.thresholds)
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._correct_classes = 0
        self._predicted = 0
        if metadata.localization == "boxes":
            # rows: V2 per IoU threshold, Top-1 Loc (V2) per IoU threshold, GT-known (V2, 50), v1 (50).
            self._counts = np.zeros((2 * len(self.iou_thresholds) + 2, len(self.thresholds)), dtype=np.int64)
        else:
            self._counts = np.zeros((2, len(self.edges) - 1), dtype=np.int64)

    def add(self, image_id: str, scoremap: np.ndarray, predicted_class: int | None = None) -> None:
        """Add one checked float64 map at `image_size`; `predicted_class` adds to Top-1 Loc/Cls."""
        label = self.metadata.class_labels[image_id]
        if self.metadata.localization == "boxes":
            counts = self._box_counts(image_id, scoremap, predicted_class == label)
        else:
            counts = np.zeros_like(self._counts)
            gt_mask = load_gt_mask(self.mask_root, self.metadata.masks[image_id], self.image_size)
            accumulate_mask_histograms(np.ascontiguousarray(scoremap), gt_mask, self.edges, self.cam_curve_interval,
                                       counts[0], counts[1])
        with self._lock:
            if image_id in self._seen:
                raise WsolbenchError(f"{self.metadata.dataset}/{self.metadata.split}: map of {image_id!r} added twice")
            self._seen.add(image_id)
            self._counts += counts
            if predicted_class is not None:
                self._predicted += 1
                self._correct_classes += predicted_class == label

    def _box_counts(self, image_id: str, scoremap: np.ndarray, right_class: bool) -> np.ndarray:
        height, width = self.image_size
        original = self.metadata.image_sizes[image_id]
        gt = np.array([rescale_box(b, original, (width, height)) for b in self.metadata.boxes[image_id]],
                      dtype=np.int64)
        best_all, best_largest = self.best_ious(scoremap, gt, self.thresholds, largest=self.with_v1,
                                                floor=self.iou_floor)
        rows = len(self.iou_thresholds)
        counts = np.zeros_like(self._counts)
        for row, iou in enumerate(self.iou_thresholds):
            counts[row] = best_all >= iou / 100
            if right_class:  # Top-1 Loc: V2 boxes whichever metric is the headline (spec §2.4)
                counts[rows + row] = counts[row]
        counts[2 * rows] = best_all >= 50 / 100  # GT-known: V2 boxes, IoU 50
        if self.with_v1:
            counts[2 * rows + 1] = best_largest >= 50 / 100
        return counts

    def counts(self) -> dict:
        """What this evaluator has added, as plain data: its integer counts and the ids it saw.
        `combine` adds such counts from other evaluators of the split (other ranks' shares)."""
        with self._lock:
            return {"counts": self._counts.copy(), "correct": self._correct_classes, "predicted": self._predicted,
                    "seen": sorted(self._seen)}

    def combine(self, counts: dict) -> None:
        """Add another evaluator's `counts()` of the same split and settings: integer sums, so the
        result is exactly the one evaluator that had seen every map would give."""
        with self._lock:
            twice = self._seen.intersection(counts["seen"])
            if twice:
                raise WsolbenchError(f"{self.metadata.dataset}/{self.metadata.split}: map of {min(twice)!r} added twice")
            self._seen.update(counts["seen"])
            self._counts += counts["counts"]
            self._correct_classes += counts["correct"]
            self._predicted += counts["predicted"]

    def result(self) -> BoxResult | MaskResult:
        meta = self.metadata
        missing = len(meta.image_ids) - len(self._seen)
        if missing:
            first = next(i for i in meta.image_ids if i not in self._seen)
            raise WsolbenchError(f"{meta.dataset}/{meta.split}: {missing} map(s) never added, the first {first!r}")
        n = len(meta.image_ids)
        with_predictions = self._predicted == n
        top1_cls = 100.0 * self._correct_classes / n if with_predictions else None
        if meta.localization == "masks":
            return MaskResult(meta.dataset, meta.split, n, self.cam_curve_interval, self.edges,
                              self._counts[0].copy(), self._counts[1].copy(), top1_cls=top1_cls)
        rows = len(self.iou_thresholds)
        percent = self._counts * 100 / n
        v2_acc = {iou: percent[i] for i, iou in enumerate(self.iou_thresholds)}
        top1_loc = {iou: percent[rows + i] for i, iou in enumerate(self.iou_thresholds)} if with_predictions else None
        v1_acc = percent[2 * rows + 1] if self.with_v1 else None
        return BoxResult(meta.dataset, meta.split, n, self.cam_curve_interval, self.headline, self.thresholds,
                         v2_acc, v1_acc, percent[2 * rows], top1_loc, top1_cls)


def evaluate_split(metadata: SplitMetadata, load_scoremap: ScoremapLoader, *,
                   cam_curve_interval: float = 0.001,
                   box_metric: Literal["v1", "v2"] = "v2",
                   mask_root: str | os.PathLike | None = None,
                   predictions: dict[str, int] | None = None,
                   iou_thresholds: Sequence[int] = IOU_THRESHOLDS,
                   image_size: tuple[int, int] = EVAL_SIZE,
                   engine: str = "fast",
                   workers: int | None = None,
                   progress: bool | Callable[[int], None] = False) -> BoxResult | MaskResult:
    """Evaluate the maps of every image of a split; boxes or masks as its localization file says.

    `load_scoremap(image_id)` returns a checked float64 map of `image_size` (see
    wsolbench.scoremaps.load_scoremap). Maps are streamed in chunks by `workers` threads
    (default: the CPU count, at most 8); at most a few chunks are in memory.
    """
    evaluator = SplitEvaluator(metadata, cam_curve_interval=cam_curve_interval, box_metric=box_metric,
                               mask_root=mask_root, iou_thresholds=iou_thresholds, image_size=image_size,
                               engine=engine)

    def work(image_ids: Sequence[str]) -> None:
        for image_id in image_ids:
            evaluator.add(image_id, load_scoremap(image_id), predictions[image_id] if predictions else None)

    workers = workers or min(os.cpu_count() or 1, 8)
    kernels.compiled()  # once, here, rather than by the first thread while the others wait for it
    # Chunks small enough to keep every thread busy, large enough to amortise the scheduling.
    chunk_size = max(1, min(64, math.ceil(len(metadata) / (4 * workers))))
    chunks = list(_chunks(metadata.image_ids, chunk_size))
    bar = None
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(total=len(metadata), desc=f"evaluate {metadata.dataset}/{metadata.split}", unit="map",
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        if workers <= 1:
            done = map(work, chunks)
            pool = None
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            done = pool.map(work, chunks)
        try:
            for chunk, _ in zip(chunks, done):
                if bar is not None:
                    bar.update(len(chunk))
                elif callable(progress):
                    progress(len(chunk))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()
    return evaluator.result()
