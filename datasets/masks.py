"""Ground-truth masks in the evaluation frame (spec §1.4).

Each instance PNG is read as 8-bit grey, resized to the evaluation size with OpenCV nearest
neighbour (source index floor(dst * src / dst_size)) and binarised with `> 0.5`, so any non-zero
grey level is foreground. Instances are OR-ed; the ignore region is the resized ignore PNG minus the
foreground. Encoded: 1 foreground, 0 background, 255 ignore.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wsolbench.datasets.metadata import MaskAnnotation
from wsolbench.errors import InputError

FOREGROUND, BACKGROUND, IGNORE = 1, 0, 255


def read_binary_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """One mask PNG as a boolean array of size=(height, width)."""
    import cv2  # here: a box split's evaluation never imports OpenCV

    grey = cv2.imread(os.fspath(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:  # cv2.imread reports a missing or undecodable file only by returning None
        what = "does not exist" if not path.exists() else "is not a readable image"
        raise InputError(path, f"mask file {what}")
    height, width = size
    # The reference resizes the float32 copy; nearest neighbour picks the same pixels either way.
    resized = cv2.resize(grey, (width, height), interpolation=cv2.INTER_NEAREST)
    return resized > 0.5


def load_gt_mask(mask_root: str | os.PathLike, annotation: MaskAnnotation,
                 size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """The encoded ground truth (uint8: 1 / 0 / 255) of one image at size=(height, width)."""
    mask_root = Path(mask_root)
    foreground = np.zeros(size, dtype=bool)
    for mask_path in annotation.mask_paths:
        foreground |= read_binary_mask(mask_root / mask_path, size)
    encoded = foreground.astype(np.uint8)
    if annotation.ignore_path:
        ignore = read_binary_mask(mask_root / annotation.ignore_path, size) & ~foreground
        encoded[ignore] = IGNORE
    return encoded
