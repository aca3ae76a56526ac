"""`wsolbench prepare`: the generated dataset and ILSVRC train metadata, as a user runs them."""
from __future__ import annotations

import numpy as np
from PIL import Image

from wsolbench.cli import main
from wsolbench.datasets.metadata import read_split


def test_prepare_synthetic_writes_both_datasets_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert main(["prepare", "synthetic", "--out", str(out), "--seed", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "--data-root" in printed and "SyntheticBoxes" in printed
    boxes = read_split(out / "metadata", "SyntheticBoxes", "test")
    masks = read_split(out / "metadata", "SyntheticMasks", "val")
    assert boxes.localization == "boxes" and masks.localization == "masks"
    assert read_split(out / "metadata", "SyntheticMasks", "train").localization == "none"
    assert all((out / "images" / i).is_file() for i in boxes.image_ids)
    before = (out / "images" / boxes.image_ids[0]).read_bytes()
    assert main(["prepare", "synthetic", "--out", str(out), "--quiet"]) == 2
    assert "exists and is not empty (pass --force" in capsys.readouterr().err
    assert (out / "images" / boxes.image_ids[0]).read_bytes() == before
    assert main(["prepare", "synthetic", "--out", str(out), "--seed", "2", "--quiet", "--force"]) == 0
    assert (out / "images" / boxes.image_ids[0]).read_bytes() == before  # same seed, same bytes


def test_prepare_synthetic_takes_the_sizes_of_a_miniature(tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert main(["prepare", "synthetic", "--out", str(out), "--num-classes", "2", "--train-per-class", "3",
                 "--val-per-class", "1", "--test-per-class", "2", "--source-classes", "3",
                 "--source-train-per-class", "2", "--source-val-per-class", "1", "--quiet"]) == 0
    counts = {(dataset, split): len(read_split(out / "metadata", dataset, split)) for dataset, split in (
        ("SyntheticBoxes", "train"), ("SyntheticBoxes", "val"), ("SyntheticBoxes", "test"),
        ("SyntheticSource", "train"), ("SyntheticSource", "val"))}
    assert list(counts.values()) == [6, 2, 4, 6, 3]
    capsys.readouterr()
    assert main(["prepare", "synthetic", "--out", str(tmp_path / "one"), "--num-classes", "1", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("wsolbench: error: prepare synthetic: num-classes must be in 2..100")
    assert not (tmp_path / "one").exists()


def test_prepare_ilsvrc_train_lists_images_in_sorted_wnid_order(tmp_path, capsys):
    root = tmp_path / "ILSVRC"
    for wnid, names in {"n01530575": ["b.JPEG", "a.JPEG"], "n01440764": ["x.JPEG"]}.items():
        (root / "train" / wnid).mkdir(parents=True)
        for name in names:
            Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / "train" / wnid / name, format="JPEG")
    (root / "train" / "n01440764" / "notes.txt").write_text("not an image")
    assert main(["prepare", "ilsvrc-train", "--imagenet-root", str(root), "--out", str(tmp_path / "meta")]) == 0
    meta = read_split(tmp_path / "meta", "ILSVRC", "train")
    assert meta.image_ids == ["train/n01440764/x.JPEG", "train/n01530575/a.JPEG", "train/n01530575/b.JPEG"]
    assert [meta.class_labels[i] for i in meta.image_ids] == [0, 1, 1]
    assert meta.localization == "none"
    assert main(["prepare", "ilsvrc-train", "--imagenet-root", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "meta2")]) == 2
    assert "nowhere/train: no such folder" in capsys.readouterr().err
