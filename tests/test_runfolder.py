"""The run folder: its layout, atomic writes, one-line errors for damaged files, the code's commit."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import wsolbench.runfolder
from wsolbench.errors import InputError
from wsolbench.runfolder import RunFolder, source_version


def test_the_layout_is_the_documented_one(tmp_path):
    folder = RunFolder(tmp_path / "run")
    relative = {name: path.relative_to(tmp_path / "run").as_posix() for name, path in {
        "config": folder.config, "history": folder.history, "checkpoint": folder.checkpoint,
        "metrics": folder.metrics, "curves": folder.curves, "scoremaps": folder.scoremaps("test"),
        "predictions": folder.predictions("val")}.items()}
    assert relative == {"config": "config.json", "history": "history.json", "checkpoint": "checkpoints/last.pt",
                        "metrics": "metrics.json", "curves": "curves.json", "scoremaps": "scoremaps/test",
                        "predictions": "predictions/val.csv"}


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
    assert sorted(p.name for p in folder.path.rglob("*")) == sorted(
        ["config.json", "history.json", "metrics.json", "predictions", "test.csv"])


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
