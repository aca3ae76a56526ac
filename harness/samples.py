"""The pictures of a run (paper Fig. 4): a few fixed test images, each with the run's score map,
its ground truth and what the run predicted, as collect stores them for the report.

    images = pick_sample_ids(metadata, count=6)          # the same images for every run of a dataset
    image_rows, map_rows = run_samples(folder, config, curves, count=6)

Which images: the first test image (in image_ids.txt order) of each of the first `count` classes
in label order, so every method and variant on one dataset shows the same images, and a
collect of the same files picks the same ones.

What is stored (the report reads only the store):
  sample_images  per (dataset, split, image_id): the image as a PNG thumbnail (the longer side
                 THUMBNAIL_SIDE px, aspect kept), its size, its class, and the ground truth at the
                 evaluation size: the boxes rescaled as the evaluator rescales them (spec §1.4),
                 or for a mask dataset the GT mask (1 object, 0 background, 255 ignore) as a PNG
  sample_maps    per (run_id, split, image_id): the run's score map at the evaluation size as an
                 8-bit PNG (spec §2.2's own quantisation, uint8(S * 255)), the predicted class,
                 and the localisation at the run's optimal threshold: for boxes, the threshold
                 that maximises GT-known Loc (curves.json) and the box that scored there (of all
                 contours' boxes, spec §2.2, the one with the best IoU against the image's GT
                 boxes) with that IoU; for masks, the pIoU-optimal threshold (the predicted
                 region is the map >= it, as the PR curve counts it)
Coordinates of predicted boxes are in evaluation-size pixels (inclusive), as the evaluator's.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from wsolbench.datasets.metadata import SplitMetadata
from wsolbench.errors import WsolbenchError

THUMBNAIL_SIDE = 160
DEFAULT_SAMPLE_COUNT = 6


def pick_sample_ids(metadata: SplitMetadata, count: int = DEFAULT_SAMPLE_COUNT) -> list[str]:
    """The first image of each of the first `count` classes (by label), in label order."""
    first: dict[int, str] = {}
    for image_id in metadata.image_ids:
        first.setdefault(metadata.class_labels[image_id], image_id)
    return [first[label] for label in sorted(first)[:count]]


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 array (H, W) or (H, W, 3) as PNG bytes; PIL writes no time stamp, so the same
    array gives the same bytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def _thumbnail(path: Path) -> tuple[bytes, int, int]:
    from wsolbench.datasets.images import load_image

    image = load_image(path)
    width, height = image.size
    scale = THUMBNAIL_SIDE / max(width, height)
    if scale < 1:
        from PIL import Image

        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    return png_bytes(np.asarray(image)), width, height


def _best_box(scoremap: np.ndarray, threshold: float, gt_boxes: np.ndarray) -> tuple[list[int], float]:
    """The all-contours box (spec §2.2) at `threshold` with the best IoU against the GT boxes."""
    from wsolbench.evaluator import contour_boxes, multiple_iou, quantize, threshold_levels

    quantized = quantize(scoremap)
    level = int(threshold_levels(np.array([threshold]), int(quantized.max()))[0])
    boxes = contour_boxes(quantized, level, multi_contour=True)
    ious = multiple_iou(boxes, gt_boxes).max(axis=1)
    best = int(np.argmax(ious))
    return [int(v) for v in boxes[best]], float(ious[best])


def run_samples(folder: Any, config: dict[str, Any], curves: dict[str, Any] | None,
                count: int = DEFAULT_SAMPLE_COUNT) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(sample_images rows, sample_maps rows) of one completed run folder (a RunFolder) whose
    resolved config is `config`. Raises WsolbenchError saying what is missing (the data folders
    the run trained on, its score maps, its curves)."""
    from wsolbench.datasets.metadata import read_split
    from wsolbench.evaluator import read_predictions, rescale_box
    from wsolbench.scoremaps import load_scoremap

    split = config.get("test_split") or "test"
    dataset, image_size = config.get("dataset"), config.get("image_size")
    if not isinstance(dataset, str) or not isinstance(image_size, int):
        raise WsolbenchError("config.json has no dataset or image_size")
    if not curves or curves.get("kind") not in ("boxes", "masks"):
        raise WsolbenchError("no curves.json (the optimal threshold comes from it)")
    metadata = read_split(config.get("metadata_root"), dataset, split)
    data_root = Path(config.get("data_root") or "")
    size = (image_size, image_size)
    thresholds = np.asarray(curves["thresholds"], dtype=np.float64)
    if curves["kind"] == "boxes":
        threshold = float(thresholds[int(np.argmax(curves["gt_known_acc"]))])
    else:
        threshold = float(thresholds[int(np.argmax(curves["iou"]))])
    predictions_file = folder.predictions(split)
    predicted = read_predictions(predictions_file, metadata) if predictions_file.is_file() else {}
    image_rows, map_rows = [], []
    for image_id in pick_sample_ids(metadata, count):
        thumbnail, width, height = _thumbnail(data_root / image_id)
        row = {"dataset": dataset, "split": split, "image_id": image_id, "class_label": metadata.class_labels[image_id],
               "width": width, "height": height, "thumbnail_png": thumbnail, "localization": metadata.localization,
               "gt_boxes": None, "gt_mask_png": None, "eval_size": image_size}
        scoremap = load_scoremap(folder.scoremaps(split), image_id, size)
        map_row = {"split": split, "image_id": image_id, "map_png": png_bytes((scoremap * 255).astype(np.uint8)),
                   "predicted_class": predicted.get(image_id), "threshold": threshold, "predicted_box": None,
                   "predicted_iou": None}
        if metadata.localization == "boxes":
            # In the evaluation frame, rescaled as the evaluator does (spec §1.4), like the maps.
            scaled = np.array([rescale_box(box, (width, height), (image_size, image_size))
                               for box in metadata.boxes[image_id]])
            row["gt_boxes"] = json.dumps(scaled.tolist())
            box, iou = _best_box(scoremap, threshold, scaled)
            map_row["predicted_box"], map_row["predicted_iou"] = json.dumps(box), iou
        elif metadata.localization == "masks":
            from wsolbench.datasets.masks import load_gt_mask

            mask_root = config.get("mask_root")
            if not mask_root:
                raise WsolbenchError("a mask dataset but config.json has no mask_root")
            row["gt_mask_png"] = png_bytes(load_gt_mask(mask_root, metadata.masks[image_id], size))
        image_rows.append(row)
        map_rows.append(map_row)
    return image_rows, map_rows
