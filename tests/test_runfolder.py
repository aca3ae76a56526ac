"""The run folder: its layout, atomic writes, one-line errors for damaged files, the code's commit."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import wsolbench.runfolder
from wsolbench.errors import InputError, WsolbenchError
from wsolbench.runfolder import RunFolder, source_version


def test_the_layout_is_the_documented_one(tmp_path):
    folder = RunFolder(tmp_path / "run")
    relative = {name: path.relative_to(tmp_path / "run").as_posix() for name, path in {
        "config": folder.config, "history": folder.history, "checkpoint": folder.checkpoint,
        "final_checkpoint": folder.final_checkpoint, "metrics": folder.metrics, "curves": folder.curves,
        "scoremaps": folder.scoremaps("test"), "predictions": folder.predictions("val"),
        "train_plot": folder.plots("train"), "val_plot": folder.plots("val")}.items()}
    assert relative == {"config": "config.json", "history": "history.json", "checkpoint": "checkpoints/last.pt",
                        "final_checkpoint": "checkpoints/final.pt", "metrics": "metrics.json",
                        "curves": "curves.json", "scoremaps": "scoremaps/test", "predictions": "predictions/val.csv",
                        "train_plot": "plots/train.json", "val_plot": "plots/val.json"}


def test_written_files_read_back_and_no_temporary_file_is_left(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.is_empty() and not folder.is_complete()
    folder.write_config({"run_id": "0123456789abcdef"})
    folder.write_history([{"epoch": 1, "loss": 0.5}], [])
    folder.write_metrics({"maxboxacc_v2": 61.5})
    folder.write_predictions("test", {"b.png": 2, "a.png": 0}, ["a.png", "b.png"])
    assert folder.read_config() == {"run_id": "0123456789abcdef"}
    assert folder.read_history() == {"train": [{"epoch": 1, "loss": 0.5}], "val": []}
    assert folder.read_metrics() == {"maxboxacc_v2": 61.5} and folder.is_complete()
    assert folder.predictions("test").read_text() == "image_id,class\na.png,0\nb.png,2\n"
    assert sorted(p.relative_to(folder.path).as_posix() for p in folder.path.rglob("*")) == sorted(
        ["config.json", "history.json", "metrics.json", "plots", "plots/train.json", "plots/val.json", "predictions",
         "predictions/test.csv"])


def test_the_plot_files_are_flat_rows_with_one_set_of_keys(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.write_history([{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.5, "L_d": 0.1}],
                         [{"epoch": 2, "maxboxacc_v2": 50.0, "maxboxacc_v2_per_iou": {"30": 70.0, "50": 50.0}}])
    assert json.loads(folder.plots("train").read_text()) == [{"epoch": 1, "loss": 0.9, "L_d": None},
                                                             {"epoch": 2, "loss": 0.5, "L_d": 0.1}]
    assert json.loads(folder.plots("val").read_text()) == [
        {"epoch": 2, "maxboxacc_v2": 50.0, "maxboxacc_v2_iou30": 70.0, "maxboxacc_v2_iou50": 50.0}]


def test_a_completed_runs_checkpoint_becomes_final_and_is_read_as_such(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.write_checkpoint({"epoch": 1})
    folder.finalize_checkpoint()
    assert not folder.checkpoint.exists() and folder.read_checkpoint(final=True) == {"epoch": 1}
    folder.write_checkpoint({"epoch": 0})  # a later run of the folder: its final.pt replaces the old one
    folder.finalize_checkpoint()
    assert folder.read_checkpoint(final=True) == {"epoch": 0}
    with pytest.raises(WsolbenchError, match=rf"^{folder.checkpoint}: no checkpoint to resume from$"):
        folder.read_checkpoint()


def test_a_corrupt_json_file_is_named_with_its_line(tmp_path):
    folder = RunFolder(tmp_path)
    folder.metrics.write_text('{\n  "maxboxacc_v2": 61.5,\n  "top1_cls": \n}\n')
    with pytest.raises(InputError, match=rf"^{folder.metrics}:4: not valid JSON \(Expecting value"):
        folder.read_metrics()
    folder.history.write_text("[1, 2]\n")
    with pytest.raises(InputError, match=rf"^{folder.history}: expected a JSON object, found a list$"):
        folder.read_history()
    with pytest.raises(InputError, match=rf"^{folder.config}: does not exist$"):
        folder.read_config()


def test_a_damaged_checkpoint_is_named(tmp_path):
    folder = RunFolder(tmp_path)
    folder.checkpoint.parent.mkdir()
    folder.checkpoint.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match=rf"^{folder.checkpoint}: not a readable checkpoint"):
        folder.read_checkpoint()


def test_source_version_is_the_checkouts_head_commit():
    source = Path(wsolbench.runfolder.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("wsolbench does not run from a git checkout here")
    version = source_version()
    assert version["commit"] == head.stdout.strip() and len(version["commit"]) == 40
    assert isinstance(version["dirty"], bool)


def test_source_version_is_none_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    outside = tmp_path / "site-packages" / "wsolbench"
    outside.mkdir(parents=True)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setattr(wsolbench.runfolder, "__file__", str(outside / "runfolder.py"))
    assert source_version() is None
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert shutil.which("git") is None
    assert source_version() is None
