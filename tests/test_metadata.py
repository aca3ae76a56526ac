"""The metadata readers: real formats, any dataset name, and one-line errors naming file and line."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from wsolbench.datasets.metadata import list_packaged_splits, packaged_metadata_root, read_split
from wsolbench.errors import InputError, WsolbenchError


def write_split(root: Path, dataset: str, split: str, **files: str) -> Path:
    folder = root / dataset / split
    folder.mkdir(parents=True, exist_ok=True)
    defaults = {
        "image_ids": "a/1.jpg\na/2.jpg\n",
        "class_labels": "a/1.jpg,0\na/2.jpg,3\n",
        "image_sizes": "a/1.jpg,100,50\na/2.jpg,20,30\n",
        "localization": "a/1.jpg,0,0,99,49\na/2.jpg,1,2,3,4\na/2.jpg,5,6,19,29\n",
    }
    defaults.update(files)
    for name, text in defaults.items():
        (folder / f"{name}.txt").write_text(text)
    return folder


def test_boxes_are_read_in_file_order_with_several_boxes_per_image(tmp_path):
    write_split(tmp_path, "AnyName", "val")
    meta = read_split(tmp_path, "AnyName", "val")
    assert meta.localization == "boxes"
    assert meta.image_ids == ["a/1.jpg", "a/2.jpg"]
    assert meta.class_labels == {"a/1.jpg": 0, "a/2.jpg": 3}
    assert meta.image_sizes["a/1.jpg"] == (100, 50)
    assert meta.boxes["a/2.jpg"] == [(1, 2, 3, 4), (5, 6, 19, 29)]
    assert meta.num_classes == 4


def test_masks_are_detected_from_the_localization_file_not_the_name(tmp_path):
    write_split(tmp_path, "CUB", "val", image_sizes="",
                localization="a/1.jpg,m/1_a.png,m/1_ignore.png\na/1.jpg,m/1_b.png,\na/2.jpg,m/2_a.png,\n")
    meta = read_split(tmp_path, "CUB", "val")
    assert meta.localization == "masks"
    assert meta.masks["a/1.jpg"].mask_paths == ("m/1_a.png", "m/1_b.png")
    assert meta.masks["a/1.jpg"].ignore_path == "m/1_ignore.png"
    assert meta.masks["a/2.jpg"].ignore_path is None


def test_empty_localization_is_a_training_split(tmp_path):
    write_split(tmp_path, "X", "train", localization="", image_sizes="")
    assert read_split(tmp_path, "X", "train").localization == "none"


def test_gzipped_files_are_read_transparently(tmp_path):
    folder = write_split(tmp_path, "X", "val")
    text = (folder / "localization.txt").read_text()
    (folder / "localization.txt").unlink()
    with gzip.open(folder / "localization.txt.gz", "wt") as handle:
        handle.write(text)
    assert read_split(tmp_path, "X", "val").boxes["a/1.jpg"] == [(0, 0, 99, 49)]


@pytest.mark.parametrize("files, where, message", [
    ({"class_labels": "a/1.jpg,0\na/2.jpg\n"}, "class_labels.txt:2", "expected 2 comma-separated fields"),
    ({"class_labels": "a/1.jpg,0\na/2.jpg,x\n"}, "class_labels.txt:2", "class label 'x' is not an integer"),
    ({"class_labels": "a/1.jpg,0\n"}, "class_labels.txt", "no line for image id 'a/2.jpg' (image_ids.txt line 2)"),
    ({"class_labels": "a/1.jpg,0\na/2.jpg,1\na/3.jpg,1\n"}, "class_labels.txt:3", "image id 'a/3.jpg' is not in image_ids.txt"),
    ({"image_ids": "a/1.jpg\na/2.jpg\na/1.jpg\n"}, "image_ids.txt:3", "repeats line 1"),
    ({"image_sizes": "a/1.jpg,100,50\n"}, "image_sizes.txt", "no line for image id 'a/2.jpg'"),
    ({"image_sizes": "a/1.jpg,100,fifty\na/2.jpg,20,30\n"}, "image_sizes.txt:1", "height 'fifty' is not an integer"),
    ({"image_sizes": "a/1.jpg,100,0\na/2.jpg,20,30\n"}, "image_sizes.txt:1", "image size 100x0 is not positive"),
    ({"image_sizes": ""}, "image_sizes.txt", "boxes need each image's original size"),
    ({"localization": "a/1.jpg,0,0,100,49\na/2.jpg,1,2,3,4\n"}, "localization.txt:1", "box (0,0,100,49) is not inside the 100x50 image"),
    ({"localization": "a/1.jpg,5,0,4,49\na/2.jpg,1,2,3,4\n"}, "localization.txt:1", "is not inside"),
    ({"localization": "a/1.jpg,0,0,99,49\n"}, "localization.txt", "no box for image id 'a/2.jpg'"),
    ({"localization": "a/1.jpg,0,0,99,49\na/2.jpg,1,2,3\n"}, "localization.txt:2", "expected 5 comma-separated fields"),
    ({"localization": "a/1.jpg,0,0\n"}, "localization.txt:1", "expected 5 fields"),
    ({"localization": "a/1.jpg,m/a.png,\na/1.jpg,m/b.png,m/ig.png\na/2.jpg,m/c.png,\n", "image_sizes": ""},
     "localization.txt:2", "ignore path on a later line"),
    ({"localization": "a/1.jpg,m/a.png,\n", "image_sizes": ""}, "localization.txt", "no mask for image id 'a/2.jpg'"),
])
def test_bad_metadata_is_one_line_naming_file_and_line(tmp_path, files, where, message):
    write_split(tmp_path, "X", "val", **files)
    with pytest.raises(InputError) as caught:
        read_split(tmp_path, "X", "val")
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(str(tmp_path / "X" / "val" / where)), text
    assert message in text


def test_a_missing_file_names_the_file(tmp_path):
    folder = write_split(tmp_path, "X", "val")
    (folder / "image_sizes.txt").unlink()
    with pytest.raises(InputError, match=r"image_sizes.txt: missing metadata file"):
        read_split(tmp_path, "X", "val")


def test_a_missing_split_lists_the_splits_there(tmp_path):
    write_split(tmp_path, "X", "val")
    with pytest.raises(WsolbenchError, match=r"no such metadata folder \(splits there: val\)"):
        read_split(tmp_path, "X", "test")


def test_missing_mask_file_is_caught_before_any_work(tmp_path):
    write_split(tmp_path, "X", "val", image_sizes="",
                localization="a/1.jpg,m/1.png,m/1_ignore.png\na/2.jpg,m/2.png,\n")
    masks = tmp_path / "masks"
    (masks / "m").mkdir(parents=True)
    for name in ("1.png", "1_ignore.png"):
        (masks / "m" / name).write_bytes(b"")
    meta = read_split(tmp_path, "X", "val")
    with pytest.raises(InputError, match=r"localization.txt:2: mask file .*m/2.png does not exist"):
        meta.check_mask_files(masks)


# ---- the real metadata -------------------------------------------------------------------------

def test_packaged_metadata_is_the_real_metadata(shared_dir):
    real = shared_dir / "wsol-metadata"
    packaged = packaged_metadata_root()
    splits = list_packaged_splits()
    assert splits == sorted((d.parent.name, d.name) for d in real.glob("*/*") if d.is_dir())
    for dataset, split in splits:
        for name in ("image_ids", "class_labels", "image_sizes", "localization"):
            with gzip.open(packaged / dataset / split / f"{name}.txt.gz", "rb") as handle:
                assert handle.read() == (real / dataset / split / f"{name}.txt").read_bytes(), (dataset, split, name)


@pytest.mark.parametrize("dataset, split, images, kind, lines", [
    ("CUB", "train", 5994, "boxes", 5994),
    ("CUB", "val", 1000, "boxes", 1000),
    ("CUB", "test", 5794, "boxes", 5794),
    ("ILSVRC", "val", 10000, "boxes", 18532),
    ("ILSVRC", "test", 50000, "boxes", 80477),
    ("OpenImages", "train", 29819, "none", 0),
    ("OpenImages", "val", 2500, "masks", 3854),
    ("OpenImages", "test", 5000, "masks", None),
])
def test_real_splits_parse_with_the_published_counts(dataset, split, images, kind, lines):
    meta = read_split(None, dataset, split)  # the packaged copy
    assert len(meta) == images
    assert meta.localization == kind
    if kind == "boxes":
        assert sum(len(b) for b in meta.boxes.values()) == lines
    elif kind == "masks":
        total = sum(len(m.mask_paths) for m in meta.masks.values())
        assert lines is None or total == lines
        assert all(m.ignore_path for m in meta.masks.values())  # OpenImages: every image has one
    assert meta.num_classes == {"CUB": 200, "ILSVRC": 1000, "OpenImages": 100}[dataset]


def test_real_ilsvrc_has_images_with_many_boxes():
    meta = read_split(None, "ILSVRC", "val")
    assert max(len(b) for b in meta.boxes.values()) == 259
