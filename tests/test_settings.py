"""The paper settings (`wsolbench setting`), the prepare stage on local image folders (`wsolbench prepare
stage`) and the ImageNet pretrain record (`wsolbench pretrain --weights imagenet`), as a user runs them.

The real datasets are not here: the CUB and ILSVRC folders below hold one tiny JPEG under every file
name the packaged metadata lists, which is all the prepare stage reads (headers, not pixels).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from pipeline_repo import ROOT, dvc, make_pipeline_repo

from wsolbench.cli import main
from wsolbench.config import read_config_file, resolve_config
from wsolbench.datasets.metadata import packaged_metadata_root, read_split
from wsolbench.settings import SETTINGS, render


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


def fake_image_folder(root: Path, dataset: str, splits: tuple[str, ...]) -> int:
    data = _jpeg()
    count = 0
    for split in splits:
        with gzip.open(packaged_metadata_root() / dataset / split / "image_ids.txt.gz", "rt") as ids:
            for image_id in ids.read().split():
                path = root / image_id
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                count += 1
    return count


@pytest.fixture(scope="module")
def cub_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("CUB_200_2011") / "images"
    assert fake_image_folder(root, "CUB", ("train", "val", "test")) == 5994 + 1000 + 5794
    return root


def write(tmp_path: Path, name: str, data_root: Path, mask_root: Path | None = None, force: bool = False) -> Path:
    args = ["setting", name, "--data-root", str(data_root), "--out", str(tmp_path / "params.yaml"),
            *(["--force"] if force else [])]
    if mask_root is not None:
        args += ["--mask-root", str(mask_root)]
    assert main(args) == 0
    return tmp_path / "params.yaml"


# --- the settings ------------------------------------------------------------------------------

def test_there_is_one_setting_per_dataset_and_backbone_of_the_paper():
    assert sorted(SETTINGS) == sorted(f"{d}-{b}" for d in ("cub", "ilsvrc", "openimages")
                                      for b in ("resnet50", "inceptionv3", "vgg16"))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_setting_resolves_each_run_to_the_spec_recipe(name, tmp_path):
    """The file names no recipe value; the runs it makes get the spec's recipe for (dataset, backbone)."""
    setting = SETTINGS[name]
    (tmp_path / "data").mkdir()
    params = write(tmp_path, name, tmp_path / "data", tmp_path / "data" if setting.needs_masks else None)
    config_section = read_config_file(f"{params}:config")
    assert config_section["pretrained"] == "imagenet" and config_section["backbone"] == setting.backbone
    for method, expected in (("cam", "spec §6.2 DA-WSOL" if setting.profile == "auto" else "spec §6.3"),
                             ("acol", "spec §6.3")):  # acol is WE-only (spec §4.7)
        config = resolve_config({"method": method, "uda": "none" if method == "acol" else "mmd", "out": "run"},
                                f"{params}:config")
        assert config.recipe.startswith(f"{expected} "), config.recipe
        assert f"{setting.dataset} {setting.backbone}" in config.recipe
        assert config.epochs == (50 if setting.dataset == "CUB" else 10)


@pytest.mark.parametrize("name, values", [
    # spec §6.2's table, row by row (DA-WSOL with MMD on CAM)
    ("cub-resnet50", dict(lr=1e-3, lr_decay_frequency=30, weight_decay=1e-4, large_feature_map=True,
                          lambda1=0.3, lambda2=2.0, start_epoch=0)),
    ("ilsvrc-resnet50", dict(lr=1e-5, lr_decay_frequency=3, lambda1=0.3, lambda2=3.0)),
    ("openimages-resnet50", dict(lr=1e-3, large_feature_map=False, lambda1=0.2, lambda2=3.0)),
    ("cub-inceptionv3", dict(lr=2e-3, weight_decay=5e-4, lambda1=1.4, lambda2=4.0, start_epoch=5)),
    ("cub-vgg16", dict(lr=1.7e-5, lr_decay_frequency=15, large_feature_map=False, lambda1=0.2, lambda2=0.1,
                       start_epoch=10)),
])
def test_the_da_wsol_settings_run_the_published_recipe(name, values, tmp_path):
    setting = SETTINGS[name]
    params = write(tmp_path, name, tmp_path, tmp_path if setting.needs_masks else None)
    config = resolve_config({"method": "cam", "uda": "mmd", "seed": 0, "out": "run"}, f"{params}:config")
    assert {key: getattr(config, key) for key in values} == values
    assert config.batch_size == 32 and config.seed == 0  # the matrix's --seed beats DA24's seed 15


def test_every_setting_has_every_param_dvc_yaml_reads(tmp_path):
    """A key dvc.yaml interpolates or declares, missing from a setting, would fail only at `dvc repro`."""
    from ruamel.yaml import YAML

    text = (ROOT / "dvc.yaml").read_text()
    pipeline = YAML(typ="safe", pure=True).load(text)
    referenced = {ref.split("[")[0] for ref in re.findall(r"\$\{([a-z_.\[\]0-9]+)\}", text)
                  if not ref.startswith(("item.", "key"))}
    declared = {entry for stage in pipeline["stages"].values() for entry in stage.get("params", [])
                if isinstance(entry, str)}
    defaults = YAML(typ="safe", pure=True).load((ROOT / "params.yaml").read_text())
    for name, setting in [("default", None), *SETTINGS.items()]:
        params = defaults if setting is None else YAML(typ="safe", pure=True).load(render(setting, "/d", "/m"))
        for key in sorted(referenced | declared):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params have no {key}"
                node = node[part]


def test_setting_keeps_the_users_edits_unless_forced(tmp_path, capsys):
    params = write(tmp_path, "cub-resnet50", tmp_path)
    write(tmp_path, "cub-vgg16", tmp_path)  # a file it wrote, unedited: replaced
    assert "backbone: vgg16" in params.read_text()
    params.write_text(params.read_text().replace("n_trials: 8", "n_trials: 20"))
    capsys.readouterr()
    assert main(["setting", "cub-resnet50", "--data-root", str(tmp_path), "--out", str(params)]) == 2
    assert "has edits of your own" in capsys.readouterr().err and "n_trials: 20" in params.read_text()
    assert main(["setting", "cub-resnet50", "--data-root", str(tmp_path), "--out", str(params), "--force"]) == 0
    assert "n_trials: 8" in params.read_text() and "backbone: resnet50" in params.read_text()


def test_setting_says_what_is_missing(tmp_path, capsys):
    assert main(["setting", "openimages-resnet50", "--data-root", str(tmp_path), "--out",
                 str(tmp_path / "p.yaml")]) == 2
    assert "pass --mask-root" in capsys.readouterr().err
    assert main(["setting", "cub-resnet50", "--data-root", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "p.yaml")]) == 2
    assert f"{tmp_path / 'nowhere'}: no such folder (--data-root is CUB_200_2011/images" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_setting_list_and_print(capsys):
    assert main(["setting", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(SETTINGS)
    assert main(["setting", "openimages-vgg16", "--print"]) == 0
    printed = capsys.readouterr().out
    assert "mask_root: MASK_ROOT" in printed and "profile: WE" in printed and "val_y: pxap" in printed


# --- the prepare stage on local folders --------------------------------------------------------

def test_prepare_stage_checks_a_cub_folder_and_writes_its_metadata(tmp_path, cub_images, capsys):
    params = write(tmp_path, "cub-resnet50", cub_images)
    out = tmp_path / "data" / "CUB"
    # prepare.out and config.metadata_root are relative paths, as DVC runs stages from the repository root
    text = params.read_text().replace("out: data/CUB", f"out: {out}").replace(
        "metadata_root: data/CUB/metadata", f"metadata_root: {out / 'metadata'}")
    params.write_text(text)
    assert main(["prepare", "stage", "--params", str(params), "--quiet"]) == 0
    assert "images checked: test 5794, train 5994, val 1000" in capsys.readouterr().out
    record = json.loads((out / "prepared.json").read_text())
    assert record["data_root"] == str(cub_images.resolve()) and record["splits"]["train"]["classes"] == 200
    for split in ("train", "val", "test"):  # the packaged metadata, byte for byte
        assert read_split(out / "metadata", "CUB", split).image_ids == read_split(None, "CUB", split).image_ids

    missing = sorted((cub_images / "200.Common_Yellowthroat").iterdir())[0]
    kept = missing.read_bytes()
    missing.unlink()
    try:
        before = (out / "prepared.json").read_bytes()
        assert main(["prepare", "stage", "--params", str(params), "--quiet"]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"wsolbench: error: {missing}: image file does not exist")
        assert (out / "prepared.json").read_bytes() == before  # the old output stands, untouched
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no half-written folder
    finally:
        missing.write_bytes(kept)


def test_prepare_stage_names_the_params_line_at_fault(tmp_path, cub_images, capsys):
    params = write(tmp_path, "cub-resnet50", cub_images)
    text = params.read_text()
    params.write_text(text.replace("metadata_root: data/CUB/metadata", "metadata_root: elsewhere"))
    line = next(i for i, row in enumerate(params.read_text().splitlines(), 1) if "metadata_root:" in row)
    assert main(["prepare", "stage", "--params", str(params), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"wsolbench: error: {params}:{line}: config.metadata_root "
                                              f"must be data/CUB/metadata")
    params.write_text(text.replace("dataset: CUB\n  out:", "dataset: CUBS\n  out:"))
    assert main(["prepare", "stage", "--params", str(params), "--quiet"]) == 2
    assert "prepare.dataset must be one of synthetic, CUB, ILSVRC, OpenImages, got 'CUBS'" in capsys.readouterr().err
    params.write_text(text.replace("out: data/CUB", "out: data/CUB\n  seed: 3"))
    assert main(["prepare", "stage", "--params", str(params), "--quiet"]) == 2
    assert "prepare.seed: a synthetic generator key" in capsys.readouterr().err


def test_prepare_stage_lists_ilsvrc_train_from_the_imagenet_folder(tmp_path, capsys):
    root = tmp_path / "imagenet"
    fake_image_folder(root, "ILSVRC", ("val", "test"))  # val2/ (ImageNetV2) and val/ (ImageNet val)
    data = _jpeg()
    for wnid, files in (("n01440764", ("a.JPEG", "b.JPEG")), ("n01443537", ("c.JPEG",))):
        for name in files:
            (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (root / "train" / wnid / name).write_bytes(data)
    params = write(tmp_path, "ilsvrc-resnet50", root)
    out = tmp_path / "data" / "ILSVRC"
    params.write_text(params.read_text().replace("out: data/ILSVRC", f"out: {out}").replace(
        "metadata_root: data/ILSVRC/metadata", f"metadata_root: {out / 'metadata'}"))
    assert main(["prepare", "stage", "--params", str(params), "--quiet"]) == 0
    assert "images checked: test 50000, train 3, val 10000" in capsys.readouterr().out
    train = read_split(out / "metadata", "ILSVRC", "train")
    assert train.image_ids == ["train/n01440764/a.JPEG", "train/n01440764/b.JPEG", "train/n01443537/c.JPEG"]
    assert [train.class_labels[i] for i in train.image_ids] == [0, 0, 1]


def test_prepare_stage_needs_the_openimages_masks(tmp_path, capsys):
    (tmp_path / "oi").mkdir()
    params = write(tmp_path, "openimages-resnet50", tmp_path / "oi", tmp_path / "oi")
    params.write_text(params.read_text().replace(f"mask_root: {(tmp_path / 'oi').resolve()}", "mask_root: null"))
    assert main(["prepare", "stage", "--params", str(params), "--quiet"]) == 2
    assert "OpenImages/test has masks: set config.mask_root" in capsys.readouterr().err


# --- pretrain --weights imagenet -----------------------------------------------------------------

def test_pretrain_imagenet_records_the_cached_file_and_trains_nothing(tmp_path, monkeypatch, capsys):
    from wsolbench.methods.backbones import pretrained

    torch.manual_seed(0)
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    weights = hub / "checkpoints" / "resnet18-randomweights.pth"  # no hex hash in the name to check
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    # torchvision's cache, here: the lookup of the real file name (resnet18-f37072fd.pth) sent to this file
    monkeypatch.setattr(pretrained, "imagenet_weight_path", lambda backbone: weights)
    out = tmp_path / "pretrained"
    assert main(["pretrain", "--weights", "imagenet", "--backbone", "resnet18", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "weights.json").read_text())
    assert record["weights"] == "imagenet" and record["source"] == "imagenet"
    assert record["path"] == str(weights) and record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == ["weights.json"]  # no weights.pth, no training record

    weights.unlink()
    capsys.readouterr()
    assert main(["pretrain", "--weights", "imagenet", "--backbone", "resnet18", "--out", str(tmp_path / "p2"),
                 "--quiet"]) == 2
    assert "ImageNet weights for resnet18 not found" in capsys.readouterr().err


# --- the pipeline's prepare stage under DVC ------------------------------------------------------

@pytest.mark.slow
def test_dvc_runs_the_prepare_stage_of_a_paper_setting(tmp_path, cub_images):
    pytest.importorskip("dvc")
    repo = make_pipeline_repo(tmp_path / "repo", "")
    write(repo, "cub-resnet50", cub_images, force=True)
    assert "Running stage 'prepare'" in dvc(repo, "repro", "prepare")
    assert (repo / "data" / "CUB" / "prepared.json").is_file()
    assert "Running stage" not in dvc(repo, "repro", "prepare")  # nothing changed, nothing rerun
    status = dvc(repo, "status", "pretrain")  # the next stage sees its dep, and the ImageNet record still to make
    assert "data/pretrained" in status
