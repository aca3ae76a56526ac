"""ILSVRC train metadata, written from a local ImageNet train folder.

The packaged metadata holds ILSVRC val (ImageNetV2) and test (ImageNet val); the train split has
1.28 M lines, too many to ship. The protocol's train ids are `train/<wnid>/<file>.JPEG` with the
class index of the wnid in sorted order (torchvision's ImageFolder order, the usual ImageNet
class index). Training needs no boxes, so localization.txt and image_sizes.txt are left empty.
"""
from __future__ import annotations

import os
from pathlib import Path

from wsolbench import atomic
from wsolbench.errors import WsolbenchError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def write_ilsvrc_train_metadata(imagenet_root: str | os.PathLike, metadata_root: str | os.PathLike,
                                force: bool = False) -> int:
    """Write `<metadata_root>/ILSVRC/train/` for `<imagenet_root>/train/<wnid>/*`; returns the count."""
    train = Path(imagenet_root) / "train"
    if not train.is_dir():
        raise WsolbenchError(f"{train}: no such folder (expected <imagenet-root>/train/<wnid>/*.JPEG)")
    wnids = sorted(d.name for d in train.iterdir() if d.is_dir())
    if not wnids:
        raise WsolbenchError(f"{train}: no class folders (expected train/<wnid>/*.JPEG)")
    ids: list[str] = []
    labels: list[str] = []
    for index, wnid in enumerate(wnids):
        files = sorted(f.name for f in (train / wnid).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for name in files:
            image_id = f"train/{wnid}/{name}"
            if "," in image_id:
                raise WsolbenchError(f"{train / wnid / name}: a comma in a file name cannot be written in the metadata format")
            ids.append(image_id)
            labels.append(f"{image_id},{index}")
    out = Path(metadata_root) / "ILSVRC" / "train"
    with atomic.directory(out, replace=force) as tmp:
        (tmp / "image_ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
        (tmp / "class_labels.txt").write_text("".join(f"{line}\n" for line in labels), encoding="utf-8")
        (tmp / "image_sizes.txt").write_text("", encoding="utf-8")
        (tmp / "localization.txt").write_text("", encoding="utf-8")
    return len(ids)
