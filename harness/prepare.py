"""The pipeline's prepare stage: the dataset that params.yaml's `prepare` section names, into `prepare.out`.

    wsolbench prepare stage --params params.yaml

`prepare.dataset: synthetic` generates the embedded default (datasets/synthetic.py) from the
section's other keys (seed and sizes). CUB, ILSVRC and OpenImages are the user's local image folders:
the images stay where they are, named once in the run config (`config.data_root`, and
`config.mask_root` for OpenImages' masks), and the stage writes into `prepare.out`

    metadata/<dataset>/<split>/   the packaged metadata of every split (ILSVRC's train split, 1.28 M
                                  lines too many to ship, listed from <data_root>/train/<wnid>/)
    prepared.json                 what was checked: the dataset, the folders, each split's image count

after checking that every image of every split is there with a readable header, and every mask file.
The runs read that metadata (`config.metadata_root` must be `<prepare.out>/metadata`, and is checked).
DVC tracks prepared.json and the metadata, not the images: hashing 1.28 M ImageNet files on every
`dvc repro` would cost more than the check. Images changed in place are therefore not seen by DVC;
`dvc repro --force prepare` (or a changed data_root) re-checks them.

The output folder appears whole or not at all (harness/atomic.py): a missing image stops the stage
with the file named, and nothing is written.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from wsolbench import atomic
from wsolbench.config import read_config_file, read_yaml_section
from wsolbench.datasets.images import WSOLImageDataset
from wsolbench.datasets.metadata import list_packaged_splits, packaged_metadata_root, read_split
from wsolbench.errors import InputError, WsolbenchError

SYNTHETIC = "synthetic"
REAL_DATASETS = ("CUB", "ILSVRC", "OpenImages")
RECORD_FILE = "prepared.json"
# The generator's knobs (datasets/synthetic.py `generate`), read from the prepare section when
# prepare.dataset is synthetic; left out, each is the embedded default's.
SYNTHETIC_KEYS = ("seed", "num_classes", "train_per_class", "val_per_class", "test_per_class", "source_classes",
                  "source_train_per_class", "source_val_per_class")

Progress = Callable[[str, int, int], None]  # (what, done, total)


def read_prepare_section(params: Path) -> tuple[dict[str, Any], Callable[[str], int | None]]:
    """The `prepare` section of a params file, checked key by key (file and line named)."""
    values, line_of = read_yaml_section(params, "prepare")
    dataset = values.get("dataset")
    choices = (SYNTHETIC, *REAL_DATASETS)
    if dataset not in choices:
        raise InputError(params, f"prepare.dataset must be one of {', '.join(choices)}, got {dataset!r}",
                         line_of("dataset"))
    if not isinstance(values.get("out"), str) or not values["out"]:
        raise InputError(params, "prepare.out must name the output folder (e.g. data/synthetic)", line_of("out"))
    allowed = {"dataset", "out", *(SYNTHETIC_KEYS if dataset == SYNTHETIC else ())}
    for key, value in values.items():
        if key not in allowed:
            why = ("a synthetic generator key, read only when prepare.dataset is synthetic"
                   if key in SYNTHETIC_KEYS else "unknown key")
            raise InputError(params, f"prepare.{key}: {why}", line_of(key))
        if key in SYNTHETIC_KEYS and (not isinstance(value, int) or isinstance(value, bool)):
            raise InputError(params, f"prepare.{key} must be an integer, got {value!r}", line_of(key))
    return values, line_of


def prepare_stage(params: str | os.PathLike, progress: Progress | None = None) -> str:
    """Run the prepare stage a params file describes; returns a one-line summary of what it wrote."""
    params = Path(params)
    section, line_of = read_prepare_section(params)
    out = Path(section["out"])
    if section["dataset"] == SYNTHETIC:
        return _prepare_synthetic(section, out, progress, params, line_of)
    _, config_lines = read_yaml_section(params, "config")
    config = read_config_file(f"{params}:config")

    def wrong(key: str, message: str) -> InputError:
        return InputError(params, f"config.{key} {message}", config_lines(key))

    dataset = section["dataset"]
    if config.get("dataset") != dataset:
        raise wrong("dataset", f"must be {dataset}, the dataset prepare.dataset names (got {config.get('dataset')!r})")
    if not config.get("data_root"):
        raise wrong("data_root", f"must name the local {dataset} image folder (the metadata's image ids are relative "
                                 f"to it)")
    expected_metadata = out / "metadata"
    if config.get("metadata_root") is None or Path(config["metadata_root"]) != expected_metadata:
        raise wrong("metadata_root", f"must be {expected_metadata}, where the prepare stage writes the metadata "
                                     f"(got {config.get('metadata_root')!r})")
    return prepare_real(dataset, Path(config["data_root"]), config.get("mask_root"), out, progress)


def _prepare_synthetic(section: dict[str, Any], out: Path, progress: Progress | None, params: Path,
                       line_of: Callable[[str], int | None]) -> str:
    from wsolbench.datasets import synthetic

    sizes = {key: section[key] for key in SYNTHETIC_KEYS if key in section and key != "seed"}
    callback = (lambda done, total: progress("generate synthetic", done, total)) if progress else None
    try:
        summary = synthetic.generate(out, seed=section.get("seed", 0), replace=True, progress=callback, **sizes)
    except ValueError as error:  # a size or seed out of range ("num_classes must be ..."), said in params terms
        key = str(error).split()[0]
        raise InputError(params, f"prepare.{error}", line_of(key)) from None
    counts = ", ".join(f"{split} {count}" for split, count in summary.images.items())
    return f"wrote {out}: {summary.num_classes} classes, images {counts}"


def prepare_real(dataset: str, data_root: Path, mask_root: str | os.PathLike | None, out: Path,
                 progress: Progress | None = None) -> str:
    """Write `out/metadata/<dataset>/<split>/` and `out/prepared.json` for a local image folder, after
    checking every image (and mask) that the metadata names."""
    from wsolbench.datasets.imagenet import write_ilsvrc_train_metadata

    if dataset not in REAL_DATASETS:
        raise WsolbenchError(f"prepare: {dataset!r} is not one of {', '.join(REAL_DATASETS)}")
    if not data_root.is_dir():
        raise WsolbenchError(f"{data_root}: {dataset} image folder (config.data_root) does not exist")
    splits = [split for name, split in list_packaged_splits() if name == dataset]
    with atomic.directory(out, replace=True) as tmp:
        metadata_root = tmp / "metadata"
        for split in splits:
            source = packaged_metadata_root() / dataset / split
            target = metadata_root / dataset / split
            target.mkdir(parents=True)
            for file in sorted(source.glob("*.txt.gz")):
                shutil.copyfile(file, target / file.name)
        if dataset == "ILSVRC" and "train" not in splits:
            write_ilsvrc_train_metadata(data_root, metadata_root)  # ids train/<wnid>/<file> under data_root
            splits.append("train")
        record: dict[str, Any] = {"dataset": dataset, "data_root": str(data_root.resolve()),
                                  "mask_root": str(Path(mask_root).resolve()) if mask_root else None, "splits": {}}
        for split in sorted(splits):
            meta = read_split(metadata_root, dataset, split)
            if meta.localization == "masks":
                if not mask_root:
                    raise WsolbenchError(f"{dataset}/{split} has masks: set config.mask_root to the folder the "
                                         f"mask paths are relative to")
                meta.check_mask_files(mask_root)
            images = WSOLImageDataset(meta, data_root, transform=lambda image: image)
            total = len(meta.image_ids)
            done = 0

            def counted(count: int, split=split, total=total) -> None:
                nonlocal done
                done += count
                progress(f"check {dataset}/{split}", done, total)
            images.check_images(progress=counted if progress else None)
            record["splits"][split] = {"images": total, "classes": meta.num_classes,
                                       "localization": meta.localization}
        atomic.write_json(tmp / RECORD_FILE, record)
    counts = ", ".join(f"{split} {info['images']}" for split, info in record["splits"].items())
    return f"wrote {out}: {dataset} metadata and {RECORD_FILE} (images checked: {counts})"
