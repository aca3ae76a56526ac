"""Score maps: from a raw class activation map to the protocol's [0, 1] map, and their files.

A score map is a float64 array at the evaluation size (224x224 in the protocol), values in [0, 1].
On disk it is `<root>/<image_id>.npy` (the image id keeps its extension and folders, as the
reference writes them).
"""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

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
    import cv2  # here: reading and checking maps (`wsolbench evaluate`) needs no OpenCV

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


# The header numpy.save writes for a C-ordered 2-D float array, the maps' usual form.
_PLAIN_HEADER = re.compile(rb"\{'descr': '(<f8|<f4)', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n")


def _read_plain_npy(path: Path) -> np.ndarray | None:
    """The array of a version-1 .npy file holding a C-ordered 2-D little-endian float array, or
    None for any other file (np.load then reads it, or says what is wrong with it).

    np.load parses the header with Python's literal_eval, with the GIL held: about 80 us per
    224x224 map against 56 us here (dev VM), and the evaluator's threads wait on each other for
    it; on 1,000 maps at interval 0.01 the whole `wsolbench evaluate` run took 1.36-1.44 s with
    this reader against 1.49-1.67 s with np.load alone (benchmarks/RESULTS.md).
    """
    with open(path, "rb") as file:
        start = file.read(10)
        if len(start) < 10 or start[:8] != b"\x93NUMPY\x01\x00":
            return None
        (header_length,) = struct.unpack("<H", start[8:10])
        match = _PLAIN_HEADER.fullmatch(file.read(header_length))
        if match is None:
            return None
        array = np.empty((int(match.group(2)), int(match.group(3))), dtype=match.group(1).decode())
        if file.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
            return None  # truncated (bytes past the array are ignored, as np.load ignores them)
    return array


def load_scoremap(root: str | os.PathLike, image_id: str, size: tuple[int, int] = (224, 224),
                  postprocess: bool = False) -> np.ndarray:
    """Read `<root>/<image_id>.npy` and check it (or post-process it, spec §1.5)."""
    path = scoremap_path(root, image_id)
    try:
        array = _read_plain_npy(path)
        if array is None:
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
