"""Every method x {none, mmd, dann} x every backbone the spec gives it trains and evaluates through
`wsolbench train` on the generated dataset, on the CPU."""
from __future__ import annotations

import shutil

import pytest

from wsolbench.cli import main
from wsolbench.datasets import synthetic
from wsolbench.methods import available_methods, method_class
from wsolbench.runfolder import RunFolder

METHODS = ("cam", "has", "acol", "spg", "adl", "cutmix")


def test_the_six_methods_are_registered():
    assert set(METHODS) <= set(available_methods())


@pytest.fixture(scope="module")
def micro_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro") / "data"
    synthetic.generate(root, seed=5, num_classes=3, train_per_class=3, val_per_class=1, test_per_class=1,
                       source_classes=0)
    return root


CASES = [(method, backbone, uda) for method in METHODS for backbone in method_class(method).backbones
         for uda in ("none", "mmd", "dann")]


@pytest.mark.parametrize("method, backbone, uda", CASES, ids=["-".join(case) for case in CASES])
def test_method_trains_and_evaluates_through_the_cli(micro_dataset, tmp_path, capsys, method, backbone, uda):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "SyntheticBoxes", "--data-root", str(micro_dataset / "images"),
                 "--metadata-root", str(micro_dataset / "metadata"), "--method", method, "--uda", uda,
                 "--backbone", backbone, "--pretrained", "none", "--epochs", "1", "--batch-size", "3",
                 "--image-size", "64", "--start-epoch", "-1", "--cam-curve-interval", "0.01",
                 "--workers", "0", "--device", "cpu", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    metrics = RunFolder(out).read_metrics()
    assert (metrics["method"], metrics["uda"], metrics["backbone"]) == (method, uda, backbone)
    for key in ("top1_cls", "gt_known_loc", "maxboxacc", "maxboxacc_v2"):
        assert 0.0 <= metrics[key] <= 100.0
    history = RunFolder(out).read_history()["train"]
    if uda != "none":  # DA-WSOL was active (start epoch -1): its losses were logged
        assert "L_d" in history[0] and "L_u" in history[0]
    shutil.rmtree(out)  # 72 runs' checkpoints would fill the disk
