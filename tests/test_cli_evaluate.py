"""`wsolbench evaluate` as a user runs it: its JSON contract, its table, its errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from wsolbench.cli import main


@pytest.fixture()
def box_split(tmp_path):
    """A two-image box split (any dataset name) and perfect score maps for it."""
    meta = tmp_path / "meta" / "MyBirds" / "val"
    meta.mkdir(parents=True)
    (meta / "image_ids.txt").write_text("a/1.jpg\nb/2.jpg\n")
    (meta / "class_labels.txt").write_text("a/1.jpg,0\nb/2.jpg,1\n")
    (meta / "image_sizes.txt").write_text("a/1.jpg,448,224\nb/2.jpg,224,224\n")
    (meta / "localization.txt").write_text("a/1.jpg,100,50,199,99\nb/2.jpg,10,10,60,80\nb/2.jpg,150,150,200,220\n")
    maps = tmp_path / "maps"
    first = np.zeros((224, 224))
    first[50:99, 50:99] = 1.0  # the GT (50, 50, 99, 99) in the 224 frame, one pixel short of it
    second = np.zeros((224, 224))
    second[150:220, 150:200] = 0.8
    (maps / "a").mkdir(parents=True)
    (maps / "b").mkdir()
    np.save(maps / "a" / "1.jpg.npy", first)
    np.save(maps / "b" / "2.jpg.npy", second)
    return tmp_path, ["--scoremap-root", str(maps), "--metadata-root", str(tmp_path / "meta"),
                      "--dataset", "MyBirds", "--split", "val"]


def run(argv, capsys):
    code = main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_is_exactly_one_object_with_the_v2_contract(box_split, capsys):
    _, argv = box_split
    code, out, err = run(argv + ["--json", "--cam-curve-interval", "0.01"], capsys)
    assert code == 0
    summary = json.loads(out)  # exactly one JSON document: json.loads fails on trailing text
    assert out.count("\n") == 1
    assert summary["MaxBoxAccV2"] == pytest.approx(100.0)
    assert set(summary["per_iou"]) == {"30", "50", "70"}
    assert set(summary["best_threshold"]) == {"30", "50", "70"}
    assert summary["GT-known Loc"] == 100.0
    assert "Top-1 Loc" not in summary


def test_v1_json_has_only_iou_50(box_split, capsys):
    _, argv = box_split
    code, out, _ = run(argv + ["--json", "--box-v1"], capsys)
    summary = json.loads(out)
    assert code == 0 and summary["metric"] == "MaxBoxAcc"
    assert summary["per_iou"] == {"50": 100.0}
    assert summary["cam_curve_interval"] == 0.001


def test_predictions_add_top1_loc_and_cls(box_split, capsys):
    root, argv = box_split
    (root / "pred.csv").write_text("image_id,class\na/1.jpg,0\nb/2.jpg,7\n")
    code, out, _ = run(argv + ["--json", "--predictions", str(root / "pred.csv")], capsys)
    summary = json.loads(out)
    assert summary["Top-1 Cls"] == 50.0 and summary["Top-1 Loc"] == 50.0


def test_table_output_and_curves_file(box_split, capsys):
    root, argv = box_split
    code, out, _ = run(argv + ["--curves", str(root / "curves.json"), "--cam-curve-interval", "0.01"], capsys)
    assert code == 0
    assert "MaxBoxAccV2" in out and "GT-known Loc" in out and "IoU 70" in out
    curves = json.loads((root / "curves.json").read_text())
    assert len(curves["thresholds"]) == 100 and len(curves["box_acc_v2"]["50"]) == 100
    assert max(curves["box_acc_v2"]["50"]) == 100.0


def test_mask_split_json_and_curves(shared_dir, tmp_path, capsys):
    golden = shared_dir / "wsol-golden" / "synth"
    maps = tmp_path / "maps"
    ids = (golden / "metadata" / "OpenImages" / "val" / "image_ids.txt").read_text().split()
    rng = np.random.default_rng(0)
    for image_id in ids:
        (maps / image_id).parent.mkdir(parents=True, exist_ok=True)
        np.save(maps / f"{image_id}.npy", rng.random((224, 224)))
    code, out, _ = run(["--scoremap-root", str(maps), "--metadata-root", str(golden / "metadata"),
                        "--dataset", "OpenImages", "--split", "val", "--mask-root", str(golden / "masks"),
                        "--json", "--curves", str(tmp_path / "c.json")], capsys)
    summary = json.loads(out)
    assert code == 0 and {"PxAP", "pIoU", "pIoU threshold"} <= set(summary)
    curves = json.loads((tmp_path / "c.json").read_text())
    assert len(curves["precision"]) == len(curves["recall"]) == 1002


@pytest.mark.parametrize("content, message", [
    (np.full((224, 224), np.nan), "score map contains NaN"),
    (np.full((224, 224), np.inf), "score map contains inf"),
    (np.full((224, 224), 1.5), "outside [0, 1]"),
    (np.full((224, 224), -0.1), "outside [0, 1]"),
    (np.zeros((112, 112)), "expected (224, 224)"),
    (np.zeros((224, 224, 3)), "expected (224, 224)"),
    (np.zeros((224, 224), dtype=np.uint8), "expected a float array"),
])
def test_bad_score_maps_are_one_line_errors_naming_the_file(box_split, capsys, content, message):
    root, argv = box_split
    np.save(root / "maps" / "b" / "2.jpg.npy", content)
    code, out, err = run(argv + ["--json", "--curves", str(root / "curves.json")], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"wsolbench: error: {root / 'maps' / 'b' / '2.jpg.npy'}: ")
    assert message in err
    assert not (root / "curves.json").exists()  # nothing is written on error


def test_a_missing_map_fails_before_any_work(box_split, capsys):
    root, argv = box_split
    (root / "maps" / "b" / "2.jpg.npy").unlink()
    code, _, err = run(argv, capsys)
    assert code == 2 and "2.jpg.npy: missing score map for image id 'b/2.jpg'" in err


def test_a_corrupt_map_file_is_named(box_split, capsys):
    root, argv = box_split
    (root / "maps" / "b" / "2.jpg.npy").write_bytes(b"not numpy")
    code, _, err = run(argv, capsys)
    assert code == 2 and "2.jpg.npy: not a readable .npy array" in err


def test_postprocess_accepts_raw_maps_like_the_protocol(box_split, capsys):
    root, argv = box_split
    raw = np.zeros((14, 14))
    raw[9:13, 9:13] = 42.0  # a raw CAM at feature resolution, any range
    np.save(root / "maps" / "b" / "2.jpg.npy", raw)
    code, _, err = run(argv + ["--json"], capsys)
    assert code == 2
    code, out, _ = run(argv + ["--json", "--postprocess"], capsys)
    assert code == 0 and json.loads(out)["num_images"] == 2


def test_bad_predictions_name_file_and_line(box_split, capsys):
    root, argv = box_split
    (root / "pred.csv").write_text("a/1.jpg,0\nz/9.jpg,1\n")
    code, _, err = run(argv + ["--predictions", str(root / "pred.csv")], capsys)
    assert code == 2 and f"{root / 'pred.csv'}:2: image id 'z/9.jpg' is not in MyBirds/val" in err


def test_bad_metadata_exits_2_with_the_line(box_split, capsys):
    root, argv = box_split
    (root / "meta" / "MyBirds" / "val" / "localization.txt").write_text("a/1.jpg,100,50,999,99\nb/2.jpg,1,1,2,2\n")
    code, _, err = run(argv, capsys)
    assert code == 2 and "localization.txt:1: box (100,50,999,99) is not inside the 448x224 image" in err


def test_console_command_keeps_stdout_clean_for_json(box_split):
    _, argv = box_split
    done = subprocess.run([sys.executable, "-m", "wsolbench", "evaluate", *argv, "--json"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["MaxBoxAccV2"] == pytest.approx(100.0)


@pytest.mark.parametrize("array", [
    np.linspace(0, 1, 224 * 224).reshape(224, 224),                       # the usual float64 map
    np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(224, 224),     # float32
    np.asfortranarray(np.linspace(0, 1, 224 * 224).reshape(224, 224)),    # Fortran order
    np.linspace(0, 1, 224 * 224).reshape(224, 224).astype(">f8"),         # big-endian
], ids=["float64", "float32", "fortran", "big-endian"])
def test_maps_read_as_numpy_reads_them(tmp_path, array):
    from wsolbench.scoremaps import load_scoremap
    np.save(tmp_path / "x.jpg.npy", array)
    loaded = load_scoremap(tmp_path, "x.jpg")
    assert loaded.dtype == np.float64 and np.array_equal(loaded, np.load(tmp_path / "x.jpg.npy"))


@pytest.mark.parametrize("damage", ["truncated", "header only"])
def test_a_damaged_map_file_is_named(tmp_path, damage):
    from wsolbench.errors import InputError
    from wsolbench.scoremaps import load_scoremap
    path = tmp_path / "x.jpg.npy"
    np.save(path, np.zeros((224, 224)))
    content = path.read_bytes()
    path.write_bytes({"truncated": content[:-8], "header only": content[:128]}[damage])
    with pytest.raises(InputError, match=r"x\.jpg\.npy: not a readable \.npy array"):
        load_scoremap(tmp_path, "x.jpg")
