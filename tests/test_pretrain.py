"""Pretraining on the source task: the embedded default's ImageNet (wsolbench pretrain)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wsolbench.cli import main
from wsolbench.config import resolve_config
from wsolbench.datasets import synthetic
from wsolbench.experiment import build_model
from wsolbench.methods.backbones.pretrained import sha256_of_file
from wsolbench.pretrain import RECORD_FILE, WEIGHTS_FILE


@pytest.fixture(scope="module")
def source_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source") / "data"
    synthetic.generate(root, seed=2, num_classes=2, train_per_class=2, val_per_class=1, test_per_class=1,
                       source_classes=3, source_train_per_class=4, source_val_per_class=2)
    return root


def pretrain_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data-root", str(data / "images"), "--metadata-root", str(data / "metadata"),
            "--image-size", "64", "--epochs", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--out", str(out), "--quiet", *extra]


def test_pretrain_writes_weights_that_fine_tuning_loads(source_data, tmp_path, capsys):
    out = tmp_path / "pretrained"
    assert main(pretrain_args(source_data, out)) == 0, capsys.readouterr().err
    weights = out / WEIGHTS_FILE
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["sha256"] == sha256_of_file(weights)
    assert record["num_classes"] == 3  # the source task's classes, not the WSOL task's
    assert record["config"]["dataset"] == "SyntheticSource" and record["config"]["profile"] == "WE"
    assert [entry["epoch"] for entry in record["history"]] == [1, 2]
    assert 0.0 <= record["val_top1"] <= 100.0
    state = torch.load(weights, weights_only=True)
    assert state["fc.weight"].shape == (3, 256)  # torchvision's names: trunk + fc (C = 256)
    assert not any(key.startswith(("head.", "inserted.")) for key in state)

    # The WSOL run loads the trunk exactly and drops the source classifier (spec §3.1).
    config = resolve_config(dict(dataset="SyntheticBoxes", data_root="x", out="y", pretrained=str(weights)))
    assert config.backbone == "resnet10_half"
    model = build_model(config, num_classes=2)
    backbone = model.backbone
    assert backbone.pretrained_info.sha256 == record["sha256"]
    assert backbone.pretrained_info.dropped_keys == ("fc.bias", "fc.weight")
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_pretraining_once_refuses_to_overwrite_its_weights(source_data, tmp_path, capsys):
    out = tmp_path / "pretrained"
    assert main(pretrain_args(source_data, out)) == 0
    before = (out / WEIGHTS_FILE).read_bytes()
    capsys.readouterr()
    assert main(pretrain_args(source_data, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"wsolbench: error: {out / WEIGHTS_FILE}: exists already (pretraining runs once; remove it to redo it)"
    assert (out / WEIGHTS_FILE).read_bytes() == before


def test_pretraining_is_classification_only(source_data, tmp_path, capsys):
    assert main(pretrain_args(source_data, tmp_path / "p", "--uda", "mmd")) == 2
    assert "pretraining is classification only" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_a_missing_source_split_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    synthetic.generate(data, seed=2, num_classes=2, train_per_class=1, val_per_class=1, test_per_class=1,
                       source_classes=0)
    assert main(pretrain_args(data, tmp_path / "p")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SyntheticSource" in err
    assert not (tmp_path / "p").exists()


def test_the_synthetic_recipe_needs_the_pretrained_backbone_named(tmp_path, capsys):
    """resnet10_half has no ImageNet file: the default 'imagenet' says how to get weights."""
    data = tmp_path / "data"
    synthetic.generate(data, seed=2, num_classes=2, train_per_class=1, val_per_class=1, test_per_class=1,
                       source_classes=0)
    code = main(["train", "--dataset", "SyntheticBoxes", "--data-root", str(data / "images"),
                 "--metadata-root", str(data / "metadata"), "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--dry-run"])
    assert code == 2
    assert "wsolbench pretrain" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_same_seed_pretrains_the_same_weights_and_another_seed_differs(source_data, tmp_path):
    def weights(name: str, seed: str) -> dict[str, torch.Tensor]:
        assert main(pretrain_args(source_data, tmp_path / name, "--seed", seed)) == 0
        return torch.load(tmp_path / name / WEIGHTS_FILE, weights_only=True)

    first, again, other = weights("a", "3"), weights("b", "3"), weights("c", "4")
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])
