"""Score maps: from a raw class activation map to the protocol's [0, 1] map, and their files.

A score map is a float64 array at the evaluation size (224x224 in the protocol), values in [0, 1].
On disk it is `<root>/<image_id>.npy` (the image id keeps its extension and folders, as the
reference writes them).
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from wsolbench.errors import InputError, WsolbenchError


def normalize_scoremap(scoremap: np.ndarray) -> np.ndarray:
    """Spec §1.5 step 4: min-max to [0, 1]; a map with a NaN, or a constant map, becomes zeros."""
    if np.isnan(scoremap).any():
        return np.zeros_like(scoremap)
    low = scoremap.min()
    if low == scoremap.max():
        return np.zeros_like(scoremap)
    scoremap = scoremap - low
    return scoremap / scoremap.max()


def postprocess_cam(cam: np.ndarray, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """Spec §1.5 steps 2-4: float64, OpenCV bicubic resize to size=(height, width), min-max.

    No ReLU: negative raw values simply map towards 0 (spec §1.5).
    """
    cam = np.asarray(cam, dtype=np.float64)
    height, width = size
    if cam.shape != (height, width):
        cam = cv2.resize(cam, (width, height), interpolation=cv2.INTER_CUBIC)  # dsize is (w, h)
    return normalize_scoremap(cam)


def scoremap_path(root: str | os.PathLike, image_id: str) -> Path:
    return Path(root) / f"{image_id}.npy"


def check_scoremap(scoremap: np.ndarray, path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """Return the map as float64, or raise a one-line error naming the file."""
    if scoremap.ndim != 2 or scoremap.shape != tuple(size):
        raise InputError(path, f"score map has shape {scoremap.shape}, expected {tuple(size)} (the evaluation "
                               f"size); --postprocess resizes and normalises raw maps as the protocol does")
    if not np.issubdtype(scoremap.dtype, np.floating):
        raise InputError(path, f"score map has dtype {scoremap.dtype}, expected a float array")
    scoremap = scoremap.astype(np.float64, copy=False)
    if not np.isfinite(scoremap).all():
        bad = "NaN" if np.isnan(scoremap).any() else "inf"
        raise InputError(path, f"score map contains {bad}")
    low, high = scoremap.min(), scoremap.max()
    if low < 0.0 or high > 1.0:
        raise InputError(path, f"score map values span [{low:.6g}, {high:.6g}], outside [0, 1]; "
                               f"--postprocess min-max normalises raw maps as the protocol does")
    return scoremap


def check_scoremaps_exist(root: str | os.PathLike, image_ids: list[str]) -> None:
    """Fail before any work starts if a map is missing (the first one, by the split's order)."""
    for image_id in image_ids:
        path = scoremap_path(root, image_id)
        if not path.is_file():
            raise InputError(path, f"missing score map for image id {image_id!r}")


def load_scoremap(root: str | os.PathLike, image_id: str, size: tuple[int, int] = (224, 224),
                  postprocess: bool = False) -> np.ndarray:
    """Read `<root>/<image_id>.npy` and check it (or post-process it, spec §1.5)."""
    path = scoremap_path(root, image_id)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(path, f"missing score map for image id {image_id!r}") from None
    except (OSError, ValueError, EOFError) as error:
        raise InputError(path, f"not a readable .npy array ({error})") from None
    if not isinstance(array, np.ndarray):
        raise InputError(path, "not a single .npy array")
    if postprocess:
        if array.ndim != 2 or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise InputError(path, f"cannot post-process an array of shape {array.shape} and dtype {array.dtype}")
        array = postprocess_cam(array, size)
    return check_scoremap(array, path, size)


def save_scoremap(root: str | os.PathLike, image_id: str, scoremap: np.ndarray) -> Path:
    """Write one map (the caller makes the folder atomic; see wsolbench.atomic.directory)."""
    path = scoremap_path(root, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scoremap.dtype != np.float64:
        raise WsolbenchError(f"{path}: score maps are saved as float64 (got {scoremap.dtype})")
    np.save(path, scoremap, allow_pickle=False)
    return path
