"""Readers for the split metadata of the "Evaluating WSOL right" protocol (spec §1.2).

One folder per `<metadata_root>/<dataset>/<split>/` holds four files:

    image_ids.txt      <image_id>                           the split's order
    class_labels.txt   <image_id>,<label>
    image_sizes.txt    <image_id>,<width>,<height>          original size; may be empty for masks
    localization.txt   <image_id>,x0,y0,x1,y1               boxes, inclusive, several per image
                  or   <image_id>,<mask_path>,<ignore_path> masks; the ignore path only on an
                                                            image's first line
                  or   (empty)                              no localization (training splits)

Whether a split has boxes or masks is read from its localization file, never from the dataset's
name, so any dataset name works. Each file may also be stored gzip-compressed as `<name>.txt.gz`
(that is how the package ships the real CUB/ILSVRC/OpenImages metadata).

Every problem is reported as one `InputError` naming the file and line at fault.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Literal

from wsolbench.errors import InputError, WsolbenchError

METADATA_FILES = ("image_ids", "class_labels", "image_sizes", "localization")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class MaskAnnotation:
    """The instance masks of one image and its ignore mask (None: no ignore region)."""

    mask_paths: tuple[str, ...]
    ignore_path: str | None


@dataclass
class SplitMetadata:
    """The metadata of one split, in the order of its image_ids.txt."""

    folder: Path
    dataset: str
    split: str
    image_ids: list[str]
    class_labels: dict[str, int]
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (width, height)
    localization: Literal["boxes", "masks", "none"] = "none"
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    masks: dict[str, MaskAnnotation] = field(default_factory=dict)
    _mask_lines: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)  # (id, path) -> line

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return max(self.class_labels.values(), default=-1) + 1

    def subset(self, image_ids: list[str]) -> "SplitMetadata":
        """The same split restricted to some of its images (in the order given)."""
        unknown = [i for i in image_ids if i not in self.class_labels]
        if unknown:
            raise WsolbenchError(f"{self.folder}: image id {unknown[0]!r} is not in {self.dataset}/{self.split}")
        keep = set(image_ids)
        return SplitMetadata(
            folder=self.folder, dataset=self.dataset, split=self.split, image_ids=list(image_ids),
            class_labels={i: self.class_labels[i] for i in image_ids},
            image_sizes={i: s for i, s in self.image_sizes.items() if i in keep},
            localization=self.localization,
            boxes={i: b for i, b in self.boxes.items() if i in keep},
            masks={i: m for i, m in self.masks.items() if i in keep},
            _mask_lines={k: v for k, v in self._mask_lines.items() if k[0] in keep})

    def file(self, name: str) -> Path:
        """The path of one of the four files as it exists on disk (plain or .gz)."""
        return _find_file(self.folder, name)

    def check_mask_files(self, mask_root: str | os.PathLike) -> None:
        """Fail before any work starts if a mask or ignore file named here does not exist."""
        loc = self.file("localization")
        mask_root = Path(mask_root)
        if not mask_root.is_dir():
            raise WsolbenchError(f"{mask_root}: mask root folder does not exist")
        for image_id in self.image_ids:
            annotation = self.masks[image_id]
            for path in annotation.mask_paths + ((annotation.ignore_path,) if annotation.ignore_path else ()):
                if not (mask_root / path).is_file():
                    line = self._mask_lines.get((image_id, path))
                    raise InputError(loc, f"mask file {mask_root / path} does not exist", line)



def packaged_metadata_root() -> Path:
    """The folder of the real CUB/ILSVRC/OpenImages metadata shipped inside the package."""
    return Path(str(resources.files("wsolbench.datasets") / "data"))


def list_packaged_splits() -> list[tuple[str, str]]:
    root = packaged_metadata_root()
    return sorted((d.parent.name, d.name) for d in root.glob("*/*") if d.is_dir())


def _find_file(folder: Path, name: str) -> Path:
    plain = folder / f"{name}.txt"
    if plain.is_file():
        return plain
    packed = folder / f"{name}.txt.gz"
    if packed.is_file():
        return packed
    raise InputError(plain, f"missing metadata file (expected {name}.txt or {name}.txt.gz in {folder})")


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, comma-separated fields) of each non-blank line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            for number, raw in enumerate(handle, start=1):
                line = raw.rstrip("\r\n")
                if line.strip():
                    yield number, line.split(",")
    except UnicodeDecodeError as error:
        raise InputError(path, f"not UTF-8 text ({error.reason})") from None
    except (OSError, EOFError) as error:  # unreadable, or a broken .gz
        raise InputError(path, f"cannot read: {error}") from None


def _int(path: Path, number: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(path, f"{what} {text!r} is not an integer", number) from None


def _expect_fields(path: Path, number: int, fields: list[str], count: int, layout: str) -> None:
    if len(fields) != count:
        raise InputError(path, f"expected {count} comma-separated fields ({layout}), found {len(fields)}", number)
    if not fields[0]:
        raise InputError(path, "empty image id", number)


def read_split(metadata_root: str | os.PathLike | None, dataset: str, split: str) -> SplitMetadata:
    """Read and check `<metadata_root>/<dataset>/<split>/`; None reads the packaged metadata."""
    root = packaged_metadata_root() if metadata_root is None else Path(metadata_root)
    folder = root / dataset / split
    if not folder.is_dir():
        available = sorted(p.name for p in (root / dataset).iterdir() if p.is_dir()) if (root / dataset).is_dir() else []
        hint = f" (splits there: {', '.join(available)})" if available else ""
        raise WsolbenchError(f"{folder}: no such metadata folder{hint}")

    ids_file = _find_file(folder, "image_ids")
    image_ids: list[str] = []
    id_line: dict[str, int] = {}
    for number, fields in _lines(ids_file):
        _expect_fields(ids_file, number, fields, 1, "image_id")
        image_id = fields[0]
        if image_id in id_line:
            raise InputError(ids_file, f"image id {image_id!r} repeats line {id_line[image_id]}", number)
        id_line[image_id] = number
        image_ids.append(image_id)

    def unknown_id(path: Path, number: int, image_id: str) -> InputError:
        return InputError(path, f"image id {image_id!r} is not in {ids_file.name}", number)

    def missing_ids(path: Path, present: set[str] | dict) -> None:
        for image_id in image_ids:
            if image_id not in present:
                raise InputError(path, f"no line for image id {image_id!r} ({ids_file.name} line {id_line[image_id]})")

    labels_file = _find_file(folder, "class_labels")
    class_labels: dict[str, int] = {}
    for number, fields in _lines(labels_file):
        _expect_fields(labels_file, number, fields, 2, "image_id,class_label")
        image_id = fields[0]
        if image_id not in id_line:
            raise unknown_id(labels_file, number, image_id)
        if image_id in class_labels:
            raise InputError(labels_file, f"second label for image id {image_id!r}", number)
        label = _int(labels_file, number, fields[1], "class label")
        if label < 0:
            raise InputError(labels_file, f"class label {label} is negative", number)
        class_labels[image_id] = label
    missing_ids(labels_file, class_labels)

    # image_sizes.txt is only needed to rescale boxes; OpenImages ships it empty.
    sizes_file = _find_file(folder, "image_sizes")
    image_sizes: dict[str, tuple[int, int]] = {}
    for number, fields in _lines(sizes_file):
        _expect_fields(sizes_file, number, fields, 3, "image_id,width,height")
        image_id = fields[0]
        if image_id not in id_line:
            raise unknown_id(sizes_file, number, image_id)
        width = _int(sizes_file, number, fields[1], "width")
        height = _int(sizes_file, number, fields[2], "height")
        if width <= 0 or height <= 0:
            raise InputError(sizes_file, f"image size {width}x{height} is not positive", number)
        image_sizes[image_id] = (width, height)
    if image_sizes:
        missing_ids(sizes_file, image_sizes)

    meta = SplitMetadata(folder=folder, dataset=dataset, split=split, image_ids=image_ids,
                         class_labels=class_labels, image_sizes=image_sizes)
    _read_localization(meta, _find_file(folder, "localization"), id_line, sizes_file)
    return meta


def _read_localization(meta: SplitMetadata, path: Path, id_line: dict[str, int], sizes_file: Path) -> None:
    lines = _lines(path)
    first = next(lines, None)
    if first is None:
        return  # no localization: a training split
    number, fields = first
    if len(fields) == 5:
        meta.localization = "boxes"
    elif len(fields) == 3 and not fields[1].strip().lstrip("-").isdigit():
        meta.localization = "masks"
    else:
        raise InputError(path, f"expected 5 fields (image_id,x0,y0,x1,y1) or 3 fields "
                               f"(image_id,mask_path,ignore_path), found {len(fields)}", number)

    def all_lines():
        yield number, fields
        yield from lines

    if meta.localization == "boxes":
        if not meta.image_sizes:
            raise InputError(sizes_file, "empty, but boxes need each image's original size to be rescaled")
        for number_, fields_ in all_lines():
            _expect_fields(path, number_, fields_, 5, "image_id,x0,y0,x1,y1")
            image_id = fields_[0]
            if image_id not in id_line:
                raise InputError(path, f"image id {image_id!r} is not in image_ids", number_)
            x0, y0, x1, y1 = (_int(path, number_, f, "coordinate") for f in fields_[1:])
            width, height = meta.image_sizes[image_id]
            if not (0 <= x0 <= x1 <= width - 1 and 0 <= y0 <= y1 <= height - 1):
                raise InputError(path, f"box ({x0},{y0},{x1},{y1}) is not inside the {width}x{height} image "
                                       f"(need 0 <= x0 <= x1 <= {width - 1}, 0 <= y0 <= y1 <= {height - 1})", number_)
            meta.boxes.setdefault(image_id, []).append((x0, y0, x1, y1))
        for image_id in meta.image_ids:
            if image_id not in meta.boxes:
                raise InputError(path, f"no box for image id {image_id!r} (image_ids line {id_line[image_id]})")
        return

    mask_paths: dict[str, list[str]] = {}
    ignore_paths: dict[str, str | None] = {}
    for number_, fields_ in all_lines():
        _expect_fields(path, number_, fields_, 3, "image_id,mask_path,ignore_path")
        image_id, mask_path, ignore_path = fields_
        if image_id not in id_line:
            raise InputError(path, f"image id {image_id!r} is not in image_ids", number_)
        if not mask_path:
            raise InputError(path, "empty mask path", number_)
        meta._mask_lines[(image_id, mask_path)] = number_
        if image_id in mask_paths:
            # Spec §1.2: only an image's first line carries the ignore path.
            if ignore_path:
                raise InputError(path, f"ignore path on a later line of image {image_id!r} "
                                       f"(only its first line may carry one)", number_)
            mask_paths[image_id].append(mask_path)
        else:
            mask_paths[image_id] = [mask_path]
            ignore_paths[image_id] = ignore_path or None
            if ignore_path:
                meta._mask_lines[(image_id, ignore_path)] = number_
    for image_id in meta.image_ids:
        if image_id not in mask_paths:
            raise InputError(path, f"no mask for image id {image_id!r} (image_ids line {id_line[image_id]})")
        meta.masks[image_id] = MaskAnnotation(tuple(mask_paths[image_id]), ignore_paths[image_id])
