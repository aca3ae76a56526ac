"""The generated default dataset: deterministic, in the protocol's metadata format (spec §1.2),
written atomically, and a real WSOL problem (a class-specific part on a shared body)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from wsolbench.datasets import synthetic

SMALL = dict(num_classes=3, train_per_class=3, val_per_class=4, test_per_class=3,
             source_classes=4, source_train_per_class=2, source_val_per_class=1)


def _tree_digest(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def _lines(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), f"{path}: last line must end with a newline"
    return [line.split(",") for line in text.splitlines()]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticSummary:
    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "out", seed=7, **SMALL)


def test_same_seed_gives_byte_identical_trees_and_another_seed_differs(
        tmp_path: Path, small_dataset: synthetic.SyntheticSummary) -> None:
    again = synthetic.generate(tmp_path / "again", seed=7, **SMALL)
    other = synthetic.generate(tmp_path / "other", seed=8, **SMALL)
    first_tree = _tree_digest(small_dataset.out_dir)
    assert first_tree == _tree_digest(again.out_dir)
    other_tree = _tree_digest(other.out_dir)
    differing_images = [name for name, digest in first_tree.items()
                        if name.startswith("images/") and other_tree.get(name) != digest]
    assert len(differing_images) == sum(small_dataset.images.values())


def test_changing_a_split_count_leaves_the_other_images_unchanged(tmp_path: Path) -> None:
    """Streams keyed by (seed, split, class, index): more train images reshuffle nothing."""
    fewer = synthetic.generate(tmp_path / "fewer", seed=3, num_classes=2, train_per_class=1,
                               val_per_class=1, test_per_class=1, source_classes=2, source_train_per_class=1,
                               source_val_per_class=1)
    more = synthetic.generate(tmp_path / "more", seed=3, num_classes=2, train_per_class=2,
                              val_per_class=1, test_per_class=1, source_classes=2, source_train_per_class=2,
                              source_val_per_class=1)
    fewer_tree, more_tree = _tree_digest(fewer.out_dir), _tree_digest(more.out_dir)
    for name, digest in fewer_tree.items():
        if name.startswith(("images/", "masks/")):
            assert more_tree[name] == digest, name


def test_metadata_files_list_the_same_images_in_the_same_order(
        small_dataset: synthetic.SyntheticSummary) -> None:
    for dataset in (synthetic.BOXES_DATASET, synthetic.MASKS_DATASET):
        for split in synthetic.SPLITS:
            split_dir = small_dataset.metadata_root / dataset / split
            ids = [line[0] for line in _lines(split_dir / "image_ids.txt")]
            assert len(ids) == len(set(ids)) == small_dataset.images[split]
            assert [line[0] for line in _lines(split_dir / "class_labels.txt")] == ids
            assert [line[0] for line in _lines(split_dir / "image_sizes.txt")] == ids
            localized = [line[0] for line in _lines(split_dir / "localization.txt")]
            if not (dataset == synthetic.MASKS_DATASET and split == "train"):
                # One line per instance, grouped by image, in image order.
                assert list(dict.fromkeys(localized)) == ids


def test_labels_and_sizes_match_the_folders_and_the_png_files(
        small_dataset: synthetic.SyntheticSummary) -> None:
    for split in synthetic.SPLITS:
        split_dir = small_dataset.metadata_root / synthetic.BOXES_DATASET / split
        for image_id, label in _lines(split_dir / "class_labels.txt"):
            assert image_id.split("/")[1] == f"c{int(label):02d}"
            assert 0 <= int(label) < SMALL["num_classes"]
        for image_id, width, height in _lines(split_dir / "image_sizes.txt"):
            with Image.open(small_dataset.image_root / image_id) as image:
                assert image.format == "PNG" and image.mode == "RGB"
                assert image.size == (int(width), int(height))
                low, high = synthetic.IMAGE_SIDE_RANGE
                assert low <= image.width <= high and low <= image.height <= high


def _read_mask(path: Path) -> np.ndarray:
    """As the evaluator reads masks (spec §1.4): 8-bit grayscale, any non-zero pixel is set."""
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert pixels is not None, f"{path}: missing or unreadable"
    assert set(np.unique(pixels)) <= {0, 255}, f"{path}: not a 0/255 mask"
    return pixels > 0


def test_boxes_are_inside_the_image_and_equal_the_bounding_box_of_each_mask(
        small_dataset: synthetic.SyntheticSummary) -> None:
    for split in ("val", "test"):
        boxes_dir = small_dataset.metadata_root / synthetic.BOXES_DATASET / split
        masks_dir = small_dataset.metadata_root / synthetic.MASKS_DATASET / split
        sizes = {image_id: (int(width), int(height))
                 for image_id, width, height in _lines(boxes_dir / "image_sizes.txt")}
        box_lines = _lines(boxes_dir / "localization.txt")
        mask_lines = _lines(masks_dir / "localization.txt")
        assert len(box_lines) == len(mask_lines)
        for (box_id, *box), (mask_id, mask_path, _) in zip(box_lines, mask_lines):
            assert box_id == mask_id
            x0, y0, x1, y1 = map(int, box)
            width, height = sizes[box_id]
            assert 0 <= x0 <= x1 <= width - 1 and 0 <= y0 <= y1 <= height - 1
            mask = _read_mask(small_dataset.mask_root / mask_path)
            assert mask.shape == (height, width)
            rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            assert (x0, y0, x1, y1) == (columns[0], rows[0], columns[-1], rows[-1])


def test_train_boxes_exist_for_every_train_image(small_dataset: synthetic.SyntheticSummary) -> None:
    split_dir = small_dataset.metadata_root / synthetic.BOXES_DATASET / "train"
    ids = [line[0] for line in _lines(split_dir / "image_ids.txt")]
    assert set(line[0] for line in _lines(split_dir / "localization.txt")) == set(ids)


def test_mask_metadata_puts_the_ignore_path_on_an_images_first_line_only(
        small_dataset: synthetic.SyntheticSummary) -> None:
    seen: set[str] = set()
    for split in ("val", "test"):
        split_dir = small_dataset.metadata_root / synthetic.MASKS_DATASET / split
        for image_id, mask_path, ignore_path in _lines(split_dir / "localization.txt"):
            if image_id in seen:
                assert ignore_path == ""
            else:
                seen.add(image_id)
                assert ignore_path.endswith("_ignore.png")
                assert (small_dataset.mask_root / ignore_path).is_file()
                _read_mask(small_dataset.mask_root / ignore_path)
            assert (small_dataset.mask_root / mask_path).is_file()
    # The rule above was exercised on images with a second line too.
    assert small_dataset.two_instance_images["val"] + small_dataset.two_instance_images["test"] > 0


def test_mask_dataset_train_localization_is_empty_as_openimages(
        small_dataset: synthetic.SyntheticSummary) -> None:
    path = small_dataset.metadata_root / synthetic.MASKS_DATASET / "train" / "localization.txt"
    assert path.read_bytes() == b""


def test_readme_states_the_seed_version_and_counts(
        small_dataset: synthetic.SyntheticSummary) -> None:
    readme = (small_dataset.out_dir / "README.txt").read_text(encoding="utf-8")
    assert "seed: 7" in readme
    assert f"version {synthetic.GENERATOR_VERSION}" in readme
    rows = {line.split()[0]: line.split()[1:] for line in readme.splitlines()
            if line.split()[:1] and line.split()[0] in synthetic.SPLITS}
    for split in synthetic.SPLITS:
        per_class, images, instances, two_instance = map(int, rows[split])
        assert per_class == SMALL[f"{split}_per_class"]
        assert images == small_dataset.images[split] == per_class * SMALL["num_classes"]
        assert instances == small_dataset.instances[split]
        assert two_instance == small_dataset.two_instance_images[split]


def test_written_files_hold_exactly_the_rendered_pixels_and_masks(
        small_dataset: synthetic.SyntheticSummary) -> None:
    split_dir = small_dataset.metadata_root / synthetic.MASKS_DATASET / "val"
    lines = _lines(split_dir / "localization.txt")
    mask_paths: dict[str, list[str]] = {}
    for image_id, mask_path, _ in lines:
        mask_paths.setdefault(image_id, []).append(mask_path)
    for image_id, paths in mask_paths.items():
        split, class_folder, name = image_id.split("/")
        sample = synthetic.render_sample(7, split, int(class_folder[1:]), int(name[4:9]),
                                         SMALL["num_classes"])
        with Image.open(small_dataset.image_root / image_id) as image:
            assert np.array_equal(np.asarray(image), sample.image)
        assert len(paths) == len(sample.instance_masks)
        for path, mask in zip(paths, sample.instance_masks):
            assert np.array_equal(_read_mask(small_dataset.mask_root / path), mask)
        ignore_path = paths[0].rsplit("_m", 1)[0] + "_ignore.png"
        assert np.array_equal(_read_mask(small_dataset.mask_root / ignore_path), sample.ignore_mask)


def test_instances_are_disjoint_hold_their_part_and_are_ringed_by_the_ignore_band() -> None:
    for index in range(6):
        sample = synthetic.render_sample(seed=1, split="val", class_index=index % 3, index=index,
                                         num_classes=3)
        assert 1 <= len(sample.instance_masks) <= 2
        union = np.zeros(sample.ignore_mask.shape, dtype=bool)
        for mask, part in zip(sample.instance_masks, sample.part_masks):
            assert mask.any() and part.any()
            assert not (part & ~mask).any(), "the part lies inside its object"
            assert not (mask & union).any(), "instances do not overlap"
            union |= mask
        # Every pixel just outside an object is in the ignore band.
        grown = cv2.dilate(union.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        just_outside = grown & ~union
        assert sample.ignore_mask[just_outside].all()


def _mean_colour(samples: list[synthetic.Sample], which: str) -> np.ndarray:
    pixels = []
    for sample in samples:
        for mask, part in zip(sample.instance_masks, sample.part_masks):
            region = part if which == "part" else mask & ~part
            pixels.append(sample.image[region].astype(np.float64))
    return np.concatenate(pixels).mean(axis=0)


def test_the_class_part_differs_between_classes_while_the_body_is_shared() -> None:
    num_classes = 4
    parts = synthetic.class_parts(num_classes)
    assert len({part.main_colour for part in parts}) == num_classes
    by_class = [[synthetic.render_sample(0, "train", k, i, num_classes) for i in range(6)]
                for k in range(num_classes)]
    part_colours = [_mean_colour(samples, "part") for samples in by_class]
    body_colours = [_mean_colour(samples, "body") for samples in by_class]
    smallest_part_gap = min(np.linalg.norm(part_colours[a] - part_colours[b])
                            for a in range(num_classes) for b in range(a + 1, num_classes))
    largest_body_gap = max(np.linalg.norm(body_colours[a] - body_colours[b])
                           for a in range(num_classes) for b in range(a + 1, num_classes))
    assert smallest_part_gap > 3 * largest_body_gap
    # Each image's part is close to its own class's part colour and far from the others'.
    for k, samples in enumerate(by_class):
        for sample in samples:
            colour = _mean_colour([sample], "part")
            distances = [np.linalg.norm(colour - reference) for reference in part_colours]
            assert int(np.argmin(distances)) == k


def test_the_part_is_a_small_fraction_of_the_object() -> None:
    fractions = [part.sum() / mask.sum()
                 for i in range(20)
                 for sample in [synthetic.render_sample(0, "test", i % 5, i, 5)]
                 for mask, part in zip(sample.instance_masks, sample.part_masks)]
    assert 0.02 < np.median(fractions) < 0.15


def test_an_error_mid_way_leaves_no_output_folder(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"

    def fail_after_five(done: int, total: int) -> None:
        assert total == 3 * (3 + 4 + 3) + 4 * (2 + 1)
        if done == 5:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        synthetic.generate(out_dir, seed=0, progress=fail_after_five, **SMALL)
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == [], "no temporary sibling is left behind"


def test_an_existing_folder_is_kept_unless_replace_is_given(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    tiny = dict(num_classes=2, train_per_class=1, val_per_class=1, test_per_class=1, source_classes=0)
    with pytest.raises(FileExistsError):
        synthetic.generate(out_dir, **tiny)
    assert (out_dir / "keep.txt").read_text() == "mine"
    synthetic.generate(out_dir, replace=True, **tiny)
    assert not (out_dir / "keep.txt").exists()
    assert (out_dir / "README.txt").is_file()


def test_progress_reports_every_image_up_to_the_total(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    tiny = dict(num_classes=2, train_per_class=2, val_per_class=1, test_per_class=1, source_classes=0)
    synthetic.generate(tmp_path / "out", progress=lambda done, total: calls.append((done, total)),
                       **tiny)
    assert calls == [(done, 8) for done in range(1, 9)]


@pytest.mark.parametrize("bad", [dict(num_classes=1), dict(val_per_class=0),
                                 dict(num_classes=101), dict(seed=-1), dict(source_classes=1),
                                 dict(source_train_per_class=0)])
def test_impossible_counts_are_rejected_before_anything_is_written(tmp_path: Path,
                                                                  bad: dict) -> None:
    with pytest.raises(ValueError):
        synthetic.generate(tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


def test_the_source_task_is_classification_only_with_its_own_metadata(
        small_dataset: synthetic.SyntheticSummary) -> None:
    """SyntheticSource: train and val, every image labelled, no boxes or masks (the ImageNet role)."""
    from wsolbench.datasets.metadata import read_split
    for split, folder in synthetic.SOURCE_SPLITS.items():
        meta = read_split(small_dataset.metadata_root, synthetic.SOURCE_DATASET, folder)
        assert meta.localization == "none"
        assert len(meta) == small_dataset.images[split] == SMALL["source_classes"] * SMALL[f"{split}_per_class"]
        assert sorted(set(meta.class_labels.values())) == list(range(SMALL["source_classes"]))
        assert all(image_id.startswith(f"{split}/") for image_id in meta.image_ids)
        assert all((small_dataset.image_root / image_id).is_file() for image_id in meta.image_ids)
    assert not (small_dataset.mask_root / "source_train").exists()


def test_source_classes_are_disjoint_from_the_wsol_classes() -> None:
    """No source class part has the colour, pattern and place of a WSOL class part."""
    wsol = synthetic.class_parts(10)
    source = synthetic.class_parts(20, source=True)
    wsol_looks = {(round(p.hue, 6), p.second_colour) for p in wsol}
    assert not wsol_looks & {(round(p.hue, 6), p.second_colour) for p in source}
    assert min(abs(s.hue - w.hue) for s in source for w in wsol) >= 0.02  # hues half a step apart
    # Every source image of class k carries source part k: rendering a source split uses them.
    for k in (0, 3, 4, 7):  # stripes, solid, ring, quadrants: at least half the part is its main colour
        sample = synthetic.render_sample(0, "source_train", k, 0, num_classes=20)
        pixels = sample.image[sample.part_masks[0]].astype(float)
        near_main = np.abs(pixels - np.array(source[k].main_colour)).sum(axis=1) < 30
        assert near_main.mean() > 0.4, k
