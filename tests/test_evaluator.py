"""The evaluator: the protocol's reference numbers, answers worked by hand, and the fast engine's
equivalence to the per-threshold definition."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from wsolbench.datasets.masks import load_gt_mask
from wsolbench.datasets.metadata import SplitMetadata, read_split
from wsolbench.errors import WsolbenchError
from wsolbench.evaluator import (ENGINES, MaskResult, accumulate_mask_histograms, best_ious_definition, best_ious_fast,
                                 contour_boxes, evaluate_split, histogram_edges, multiple_iou, quantize,
                                 rescale_box, score_thresholds, threshold_levels)


def golden_scoremap_module(shared_dir):
    spec = importlib.util.spec_from_file_location("golden_scoremaps", shared_dir / "wsol-golden" / "scoremaps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def golden_cases(shared_dir):
    return json.loads((shared_dir / "wsol-golden" / "cases.json").read_text())["cases"]


def golden_split(shared_dir, case):
    golden = shared_dir / "wsol-golden"
    if case["kind"] == "box":
        return read_split(golden / "metadata", case["dataset"], case["split"]), None
    if case["label"] == "synth":
        return read_split(golden / "synth" / "metadata", "OpenImages", "val"), golden / "synth" / "masks"
    # The five real OpenImages masks, with their lines of the real val metadata, in file order.
    masks = shared_dir / "wsol-testmasks"
    meta = read_split(shared_dir / "wsol-metadata", "OpenImages", "val")
    ids = [i for i in meta.image_ids if (masks / meta.masks[i].mask_paths[0]).exists()]
    return meta.subset(ids), masks


# ---- the protocol's reference evaluator, to 1e-6 ----------------------------------------------

@pytest.mark.parametrize("index", range(8))
@pytest.mark.parametrize("engine", ["fast", "definition"])
def test_golden_cases_match_the_reference_evaluator(shared_dir, index, engine):
    case = golden_cases(shared_dir)[index]
    if engine == "definition" and case["cam_curve_interval"] < 0.01 and case["kind"] == "box":
        pytest.skip("the definition engine at 0.001 takes minutes; the fast engine covers it")
    scoremaps = golden_scoremap_module(shared_dir)
    meta, mask_root = golden_split(shared_dir, case)
    assert len(meta) == case["n"]
    position = {image_id: i for i, image_id in enumerate(meta.image_ids)}
    result = evaluate_split(meta, lambda image_id: scoremaps.scoremap(position[image_id], case["seed"]),
                            cam_curve_interval=case["cam_curve_interval"], mask_root=mask_root, engine=engine,
                            box_metric="v1" if case.get("metric") == "MaxBoxAcc" else "v2").to_dict()
    if case["kind"] == "box":
        assert result["metric"] == case["metric"]
        assert result[case["metric"]] == pytest.approx(case["value"], abs=1e-6)
        assert result["per_iou"].keys() == case["per_iou"].keys()
        for iou, value in case["per_iou"].items():
            assert result["per_iou"][iou] == pytest.approx(value, abs=1e-6)
    else:
        assert result["PxAP"] == pytest.approx(case["PxAP"], abs=1e-6)
        assert result["pIoU"] == pytest.approx(case["pIoU"], abs=1e-6)


# ---- known answers (spec §2.8 and by hand) ----------------------------------------------------

def test_iou_known_answers():
    assert multiple_iou([[1, 2, 5, 6]], [[3, 1, 4, 5]])[0, 0] == pytest.approx(8 / 27)
    assert multiple_iou([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 1.0
    with pytest.raises(ValueError):
        multiple_iou([[3, 0, 2, 4]], [[0, 0, 1, 1]])


def test_box_rescale_multiplies_first_and_truncates():
    assert rescale_box((1, 2, 4, 3), (10, 20), (35, 10)) == (3, 1, 14, 1)
    assert rescale_box((1, 2, 1, 2), (3, 3), (3, 3)) == (1, 2, 1, 2)


def test_thresholds_are_numpy_arange_values_not_decimals():
    thresholds = score_thresholds(0.001)
    assert len(thresholds) == 1000
    assert thresholds[9] == 0.009000000000000001
    assert sum(thresholds[k] != k / 1000 for k in range(1000)) == 144


MAP_A = np.array([[0, 0, 0, 0, 0], [0, .4, .4, .4, .6], [0, .4, 1, .8, .6], [0, .4, .4, .4, .6]])
MAP_B = np.array([[.4, 0, .2, .2, .2], [.4, .4, 0, .4, 0], [0, 0, 0, .4, 0], [1, .6, .8, .2, .2]])


def spec_boxes(scoremap, multi_contour):
    quantized = quantize(scoremap)
    levels = threshold_levels(np.arange(0, 1, 0.2), int(quantized.max()))
    return [sorted(map(tuple, contour_boxes(quantized, level, multi_contour).tolist())) for level in levels]


def test_spec_map_a_largest_contour_boxes():
    assert spec_boxes(MAP_A, False) == [[(1, 1, 4, 3)], [(1, 1, 4, 3)], [(2, 1, 4, 3)], [(2, 2, 4, 3)], [(2, 2, 3, 3)]]


def test_spec_map_b_largest_and_all_contour_boxes():
    assert spec_boxes(MAP_B, False) == [[(0, 0, 4, 3)], [(0, 0, 2, 2)], [(0, 3, 3, 3)], [(2, 3, 3, 3)], [(0, 3, 1, 3)]]
    assert spec_boxes(MAP_B, True) == [[(0, 0, 4, 3)], sorted([(0, 1, 4, 3), (0, 0, 2, 2)]), [(0, 3, 3, 3)],
                                       sorted([(2, 3, 3, 3), (0, 3, 1, 3)]), [(0, 3, 1, 3)]]


@pytest.mark.parametrize("scoremap", [MAP_A, MAP_B], ids=["A", "B"])
def test_fast_engine_finds_the_spec_boxes(scoremap):
    thresholds = np.arange(0, 1, 0.2)
    for multi in (False, True):
        for k, boxes in enumerate(spec_boxes(scoremap, multi)):
            for box in boxes:  # with that box as the only GT, its threshold scores IoU 1
                best_all, best_largest = best_ious_fast(scoremap, np.array([box]), thresholds)
                assert (best_all if multi else best_largest)[k] == 1.0


def test_zero_map_gives_the_box_at_the_origin_at_every_threshold():
    thresholds = score_thresholds(0.01)
    zero = np.zeros((224, 224))
    assert all((contour_boxes(quantize(zero), level, True) == 0).all() for level in (0, 100, 254))
    gt = np.array([[0, 0, 1, 0]])  # IoU with [0, 0, 0, 0] is 1/2
    for engine in (best_ious_fast, best_ious_definition):
        best_all, best_largest = engine(zero, gt, thresholds)
        assert (best_all == 0.5).all() and (best_largest == 0.5).all()


def box_split(gt_boxes_per_image, size=(224, 224), labels=None):
    ids = [f"img{i}.jpg" for i in range(len(gt_boxes_per_image))]
    return SplitMetadata(folder=None, dataset="Hand", split="test", image_ids=ids,
                         class_labels={i: (labels[n] if labels else 0) for n, i in enumerate(ids)},
                         image_sizes={i: size for i in ids}, localization="boxes",
                         boxes={i: list(b) for i, b in zip(ids, gt_boxes_per_image)})


def evaluate_maps(meta, maps, **options):
    position = {image_id: i for i, image_id in enumerate(meta.image_ids)}
    return evaluate_split(meta, lambda image_id: maps[position[image_id]], **options).to_dict()


def square_map(x0, y0, x1, y1, value=1.0):
    scoremap = np.zeros((224, 224))
    scoremap[y0:y1 + 1, x0:x1 + 1] = value
    return scoremap


@pytest.mark.parametrize("engine", ["fast", "definition"])
def test_a_box_at_iou_exactly_one_half_counts_at_50_not_70(engine):
    # The square covers pixels 50..99; boundingRect's one-past edge makes the box [50, 50, 100, 100]
    # (51 x 51 = 2601 pixels); the GT [50, 50, 100, 151] holds it and is twice its area: IoU 1/2.
    meta = box_split([[(50, 50, 100, 151)]])
    result = evaluate_maps(meta, [square_map(50, 50, 99, 99)], cam_curve_interval=0.01, engine=engine)
    assert result["per_iou"] == {"30": 100.0, "50": 100.0, "70": 0.0}
    assert result["MaxBoxAccV2"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("engine", ["fast", "definition"])
def test_a_ring_is_found_by_its_hole_contour_in_v2_only(engine):
    ring = square_map(40, 40, 160, 160)
    ring[60:141, 60:141] = 0  # a hole of pixels 60..140
    # The hole contour runs through pixels 59..141; boundingRect adds one: [59, 59, 142, 142].
    meta = box_split([[(59, 59, 142, 142)]])
    v2 = evaluate_maps(meta, [ring], cam_curve_interval=0.01, engine=engine)
    v1 = evaluate_maps(meta, [ring], cam_curve_interval=0.01, engine=engine, box_metric="v1")
    assert v2["per_iou"]["70"] == 100.0
    # v1 keeps the outer contour [40, 40, 161, 161]: IoU (84 * 84) / (122 * 122) = 0.474.
    assert v1["per_iou"] == {"50": 0.0}
    assert v1["GT-known Loc"] == 100.0  # GT-known always uses all contours


@pytest.mark.parametrize("engine", ["fast", "definition"])
def test_a_hole_that_barely_beats_its_outer_contour_is_found(engine):
    # A ring two pixels thick: outer box [10, 10, 210, 210], hole pixels 12..207, so the hole
    # contour's box is [11, 11, 209, 209], the GT. The outer box's IoU with it is 199^2 / 201^2 =
    # 0.980, within 0.02 of the hole's 1.0: the hole search's bound (an IoU of at most
    # |E & G| / |G| = 1 for a box inside E) must still send the search there.
    ring = square_map(10, 10, 209, 209)
    ring[12:208, 12:208] = 0
    gt = np.array([(11, 11, 209, 209)])
    best_all, _ = ENGINES[engine](ring, gt, score_thresholds(0.01), largest=False, floor=0.3)
    assert np.all(best_all == 1.0)


@pytest.mark.parametrize("engine", ["fast", "definition"])
def test_the_second_gt_box_can_be_the_one_matched(engine):
    meta = box_split([[(0, 0, 10, 10), (120, 30, 201, 91)]])
    result = evaluate_maps(meta, [square_map(120, 30, 200, 90, value=0.7)], cam_curve_interval=0.01, engine=engine)
    assert result["per_iou"]["70"] == 100.0


def test_gt_boxes_are_rescaled_from_the_original_size():
    # Original 448 x 112: x halves, y doubles. (100, 25, 199, 74) -> (50, 50, 99, 148).
    meta = box_split([[(100, 25, 199, 74)]], size=(448, 112))
    result = evaluate_maps(meta, [square_map(50, 50, 98, 147)], cam_curve_interval=0.01)
    assert result["per_iou"]["70"] == 100.0


def test_top1_loc_counts_only_right_classes_with_its_own_threshold():
    meta = box_split([[(50, 50, 100, 100)]] * 4, labels=[0, 1, 2, 3])
    maps = [square_map(50, 50, 99, 99)] * 2 + [np.zeros((224, 224))] * 2
    predictions = {"img0.jpg": 0, "img1.jpg": 5, "img2.jpg": 2, "img3.jpg": 3}
    result = evaluate_maps(meta, maps, cam_curve_interval=0.01, predictions=predictions)
    assert result["GT-known Loc"] == 50.0
    assert result["Top-1 Loc"] == 25.0  # img0: right class and localised; img1: wrong class
    assert result["Top-1 Cls"] == 75.0


def test_best_threshold_is_the_first_maximum():
    meta = box_split([[(50, 50, 100, 100)]])
    result = evaluate_maps(meta, [square_map(50, 50, 99, 99, value=0.5)], cam_curve_interval=0.01)
    # Every threshold below 0.5 yields the same box; the first is 0.
    assert result["best_threshold"]["50"] == 0.0


def test_worker_count_does_not_change_results(shared_dir):
    case = golden_cases(shared_dir)[4]
    scoremaps = golden_scoremap_module(shared_dir)
    meta, _ = golden_split(shared_dir, case)
    position = {image_id: i for i, image_id in enumerate(meta.image_ids)}
    results = [evaluate_split(meta, lambda i: scoremaps.scoremap(position[i], 3), cam_curve_interval=0.01,
                              workers=workers).curves() for workers in (1, 2, 5)]
    assert results[0] == results[1] == results[2]


# ---- PxAP / pIoU ------------------------------------------------------------------------------

def mask_result(pairs, interval=0.001):
    thresholds = score_thresholds(interval)
    edges = histogram_edges(thresholds)
    positive = np.zeros(len(edges) - 1, dtype=np.int64)
    negative = np.zeros(len(edges) - 1, dtype=np.int64)
    for scores, gt in pairs:
        accumulate_mask_histograms(np.array([scores], dtype=np.float64), np.array([gt], dtype=np.uint8),
                                   edges, interval, positive, negative)
    return MaskResult("Hand", "test", len(pairs), interval, edges, positive, negative)


def test_pxap_and_piou_known_answers():
    one = mask_result([((.9, .4, .5, .1, 0), (1, 1, 0, 0, 0))])
    assert one.pxap == pytest.approx(250 / 3, abs=1e-9)
    assert one.piou == pytest.approx(200 / 3, abs=1e-9)


def test_an_ignore_pixel_changes_nothing():
    with_ignore = mask_result([((.9, .4, .5, .1, 0, 1.0), (1, 1, 0, 0, 0, 255))])
    assert with_ignore.pxap == pytest.approx(250 / 3, abs=1e-9)
    assert with_ignore.piou == pytest.approx(200 / 3, abs=1e-9)


def test_an_ignore_region_changes_pxap_when_it_hides_false_positives():
    # The background pixel scored 0.5 outranks the positive at 0.4; ignoring it lifts PxAP to 100.
    plain = mask_result([((.9, .4, .5), (1, 1, 0))])
    ignored = mask_result([((.9, .4, .5), (1, 1, 255))])
    assert plain.pxap == pytest.approx(100 * (0.5 * 1 + 0.5 * 2 / 3))
    assert ignored.pxap == 100.0


def test_two_images_accumulate_one_histogram():
    two = mask_result([((1, .4, .5, .1, 0), (1, 1, 0, 0, 0)), ((.3, .0005), (0, 1))])
    assert two.pxap == pytest.approx(100 * 44 / 63, abs=1e-9)
    assert two.piou == pytest.approx(50.0, abs=1e-9)


def test_histogram_bins_follow_numpy_exactly():
    rng = np.random.default_rng(0)
    for interval in (0.001, 0.01, 0.003):
        thresholds = score_thresholds(interval)
        edges = histogram_edges(thresholds)
        scores = np.concatenate([rng.random(5000), thresholds, np.nextafter(thresholds, 0)[1:], [0.0, 1.0]])
        scores = np.clip(scores, 0, 1)
        positive = np.zeros(len(edges) - 1, dtype=np.int64)
        negative = np.zeros(len(edges) - 1, dtype=np.int64)
        accumulate_mask_histograms(scores[None, :], np.ones((1, len(scores)), np.uint8), edges, interval,
                                   positive, negative)
        assert (positive == np.histogram(scores, bins=edges)[0]).all()


REAL_MASK_COUNTS = {  # (positive, negative, ignore) pixels at 224x224, spec §2.8 (OpenCV 5.0)
    "val/0bt_c3/1cd9ac0169ec7df0.jpg": (43031, 7145, 0),
    "val/0bt_c3/3a29f0b33894d4a6.jpg": (833, 49343, 0),
    "val/0bt_c3/3b3b9931325d65c9.jpg": (347, 13910, 35919),
}


def real_masks(shared_dir):
    meta = read_split(shared_dir / "wsol-metadata", "OpenImages", "val")
    root = shared_dir / "wsol-testmasks"
    return meta, root, [i for i in meta.image_ids if (root / meta.masks[i].mask_paths[0]).exists()]


def test_real_openimages_masks_decode_to_the_published_pixel_counts(shared_dir):
    meta, root, ids = real_masks(shared_dir)
    assert len(ids) == 5
    for image_id, expected in REAL_MASK_COUNTS.items():
        mask = load_gt_mask(root, meta.masks[image_id])
        counts = ((mask == 1).sum(), (mask == 0).sum(), (mask == 255).sum())
        assert counts == expected, image_id
        assert len(meta.masks[image_id].mask_paths) == (2 if "3a29" in image_id else 1)


def test_real_masks_constant_and_perfect_maps(shared_dir):
    meta, root, _ = real_masks(shared_dir)
    for image_id, (positive, negative, _) in REAL_MASK_COUNTS.items():
        single = meta.subset([image_id])
        gt = load_gt_mask(root, meta.masks[image_id])
        constant = evaluate_split(single, lambda _: np.full((224, 224), 0.37), mask_root=root)
        share = 100 * positive / (positive + negative)
        assert constant.pxap == pytest.approx(share, abs=0.1)
        assert constant.piou == pytest.approx(share, abs=0.1)
        perfect = evaluate_split(single, lambda _: (gt == 1).astype(np.float64), mask_root=root)
        assert perfect.pxap == 100.0 and perfect.piou == 100.0


def test_real_edge_case_masks_empty_and_full(shared_dir):
    meta, root, ids = real_masks(shared_dir)
    edge_cases = [i for i in ids if "0by6g" in i]
    assert len(edge_cases) == 2
    fractions = {i: (load_gt_mask(root, meta.masks[i]) == 1).mean() for i in edge_cases}
    empty = min(fractions, key=fractions.get)
    full = max(fractions, key=fractions.get)
    assert fractions[empty] == 0.0 and fractions[full] == 1.0
    rng = np.random.default_rng(1)
    with pytest.raises(WsolbenchError, match="no positive ground truth"):
        evaluate_split(meta.subset([empty]), lambda _: rng.random((224, 224)), mask_root=root)
    result = evaluate_split(meta.subset([full]), lambda _: rng.random((224, 224)), mask_root=root)
    assert result.pxap == 100.0


def test_mask_split_needs_a_mask_root(shared_dir):
    meta, _, ids = real_masks(shared_dir)
    with pytest.raises(WsolbenchError, match="pass --mask-root"):
        evaluate_split(meta.subset(ids), lambda _: np.zeros((224, 224)))


# ---- the fast engine against the definition ----------------------------------------------------

def random_monotone_map(rng, height, width):
    """Maps that stress the contour logic: noise, plateaus, rings, thin lines, holes, ties."""
    kind = rng.integers(0, 6)
    yy, xx = np.mgrid[0:height, 0:width]
    if kind == 0:
        scoremap = rng.integers(0, rng.integers(2, 8), (height, width)) / 7.0
    elif kind == 1:
        scoremap = rng.random((height, width))
    elif kind == 2:
        scoremap = np.zeros((height, width))
        for _ in range(rng.integers(1, 5)):
            cy, cx, scale = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(1, max(height, width) / 2)
            d = np.hypot(yy - cy, xx - cx) / scale
            scoremap += np.exp(-d ** 2) if rng.random() < 0.5 else np.exp(-4 * (d - 1) ** 2)
        scoremap /= scoremap.max()
    elif kind == 3:
        scoremap = (rng.random((height, width)) < rng.uniform(0.3, 0.8)) * rng.uniform(0.2, 1)
    elif kind == 4:
        scoremap = np.zeros((height, width))
        for _ in range(rng.integers(1, 8)):
            value = rng.uniform(0.1, 1)
            if rng.random() < 0.5:
                scoremap[rng.integers(0, height), rng.integers(0, width):rng.integers(0, width) + 1] = value
            else:
                scoremap[rng.integers(0, height):rng.integers(0, height) + 1, rng.integers(0, width)] = value
    else:
        scoremap = rng.random((height, width)) ** 3 * (rng.random((height, width)) < 0.5)
    return np.clip(scoremap, 0, 1).astype(np.float64)


def random_boxes(rng, height, width):
    boxes = []
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        boxes.append((x0, y0, rng.integers(x0, width), rng.integers(y0, height)))
    return np.array(boxes)


@pytest.mark.parametrize("seed", range(4))
def test_fast_engine_equals_the_definition_on_random_small_maps(seed):
    rng = np.random.default_rng(seed)
    thresholds = score_thresholds(0.01)
    for _ in range(150):
        height, width = rng.integers(2, 40, 2)
        scoremap = random_monotone_map(rng, height, width)
        gt = random_boxes(rng, height, width)
        floor = float(rng.choice([0.0, 0.3, 0.5]))
        fast = best_ious_fast(scoremap, gt, thresholds, floor=floor)
        definition = best_ious_definition(scoremap, gt, thresholds, floor=floor)
        assert np.array_equal(fast[0], definition[0]) and np.array_equal(fast[1], definition[1])
        if floor == 0.0:
            v2_only = best_ious_fast(scoremap, gt, thresholds, largest=False, floor=0.3)[0]
            assert np.array_equal(v2_only, np.where(definition[0] >= 0.3, definition[0], -1.0))


def test_fast_engine_equals_the_definition_on_full_size_maps(shared_dir):
    scoremaps = golden_scoremap_module(shared_dir)
    rng = np.random.default_rng(7)
    thresholds = score_thresholds(0.001)
    for i in range(12):
        scoremap = scoremaps.scoremap(i, 11)
        gt = random_boxes(rng, 224, 224)
        fast = best_ious_fast(scoremap, gt, thresholds)
        definition = best_ious_definition(scoremap, gt, thresholds)
        assert np.array_equal(fast[0], definition[0]) and np.array_equal(fast[1], definition[1]), i


def test_loading_the_kernels_hides_scipy_linalg_from_numba_only_while_it_starts():
    """The JIT's kernel load keeps scipy.linalg out of numba's start-up (0.1-0.2 s); afterwards
    scipy.linalg imports as usual and numba code that needs BLAS still compiles (a fresh process)."""
    import subprocess
    import sys
    pytest.importorskip("scipy")
    script = """
import sys
from wsolbench import kernels
jit = kernels.compiled("jit")
assert jit.mode == "jit"
assert "scipy.linalg" not in sys.modules, "numba imported scipy.linalg at start-up"
assert not any(type(finder).__name__ == "_HideScipy" for finder in sys.meta_path)
assert kernels.compiled("jit") is jit  # a second call does nothing
import numba, numpy as np
import scipy.linalg
dot = numba.njit(lambda a, b: np.dot(a, b))
assert dot(np.ones((2, 3)), np.ones((3, 2))).tolist() == [[3.0, 3.0], [3.0, 3.0]]
convolve = numba.njit(lambda a, b: np.convolve(a, b))
assert convolve(np.ones(3), np.ones(2)).tolist() == [1.0, 2.0, 2.0, 1.0]
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_scipy_linalg_shield_holds_only_for_the_thread_that_loads_the_kernels():
    import subprocess
    import sys
    pytest.importorskip("scipy")
    script = """
import sys, threading
from wsolbench.kernels import _HideScipy
shield = _HideScipy()
sys.meta_path.insert(0, shield)
try:
    import scipy.linalg
    raise SystemExit("the loading thread imported scipy.linalg through the shield")
except ModuleNotFoundError:
    pass
imported = []
worker = threading.Thread(target=lambda: imported.append(__import__("scipy.linalg")))
worker.start(); worker.join()
assert imported, "another thread could not import scipy.linalg"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
