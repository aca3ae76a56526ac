"""Training: the loop, the run folder, resume, determinism, and the errors before training starts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from wsolbench.config import resolve_config
from wsolbench.datasets import synthetic
from wsolbench.errors import WsolbenchError
from wsolbench.evaluator import evaluate_split
from wsolbench.datasets.metadata import read_split
from wsolbench.experiment import build_model, train_and_evaluate
from wsolbench.methods.backbones import build_backbone
from wsolbench.methods.base import ClassifierHead
from wsolbench.runfolder import RunFolder
from wsolbench.scoremaps import load_scoremap
from wsolbench.trainer import lr_factor


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.generate(root, seed=3, num_classes=3, train_per_class=8, val_per_class=3, test_per_class=3,
                       source_classes=0)
    return root


def tiny_config(data: Path, out: Path, **overrides):
    values = dict(dataset="SyntheticBoxes", data_root=str(data / "images"), metadata_root=str(data / "metadata"),
                  mask_root=str(data / "masks"), image_size=64, epochs=2, batch_size=8, eval_batch_size=16,
                  workers=0, eval_frequency=1, lr=0.01, device="cpu", seed=1, out=str(out),
                  source_samples=4, target_samples=4, start_epoch=0, pretrained="none")
    values.update(overrides)
    return resolve_config(values)


FIGURES = ("top1_cls", "top1_loc", "gt_known_loc", "maxboxacc", "maxboxacc_v2")


def test_lr_schedule_decays_at_the_start_of_epochs_divisible_by_f():
    # Spec §6.1: f = 3, 10 epochs -> epochs 1-2 at lr0, 3-5 at 0.1, 6-8 at 0.01, 9-10 at 0.001.
    factors = [lr_factor(epoch, 3) for epoch in range(10)]
    assert factors == pytest.approx([1, 1, .1, .1, .1, .01, .01, .01, .001, .001])
    assert [lr_factor(e, 30) for e in (28, 29, 49)] == pytest.approx([1, .1, .1])


@pytest.mark.parametrize("profile, family", [("DA", "resnet"), ("WE", "resnet"), ("WE", "inception")])
def test_cam_is_the_classifier_applied_at_every_position(profile, family):
    torch.manual_seed(0)
    head = ClassifierHead(6, 4, profile, family)
    features = torch.rand(2, 6, 5, 7)
    classes = torch.tensor([3, 1])
    cams = head.class_maps(features, classes)
    weight = head.weight
    manual = torch.stack([torch.einsum("c,chw->hw", weight[k], features[b]) for b, k in enumerate(classes)])
    if profile == "WE" and family == "resnet":
        expected = manual / 6  # WE's ResNet/VGG CAM: channel mean of w (.) F, no bias
    else:
        expected = manual + head.fc.bias[classes][:, None, None]
        if profile == "DA":  # float32 min-max per map
            flat = expected.flatten(1)
            expected = ((flat - flat.min(1, keepdim=True).values) /
                        (flat.max(1, keepdim=True).values - flat.min(1, keepdim=True).values)).view_as(expected)
    assert torch.allclose(cams, expected, atol=1e-6)
    # The logits are the same linear map on the GAP vector.
    logits = head(features.mean(dim=(2, 3)))
    assert torch.allclose(logits, features.mean(dim=(2, 3)) @ weight.T + head.fc.bias, atol=1e-6)


def test_lr_groups_put_the_classifier_at_ten_times():
    config = resolve_config(dict(dataset="SyntheticBoxes", data_root="x", out="y", method="cam", uda="mmd",
                                 backbone="resnet18", pretrained="none"))
    model = build_model(config, num_classes=3)
    multipliers = {name: model.lr_multiplier(name) for name, _ in model.named_parameters()}
    assert multipliers["method.head.fc.weight"] == 10.0
    assert multipliers["method.backbone.layer4.0.conv1.weight"] == 1.0  # profile DA: extractor x1
    assert all(v == 1.0 for k, v in multipliers.items() if k.startswith("method.backbone."))


def test_two_epoch_training_writes_the_run_folder_and_rescoring_agrees(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    metrics = train_and_evaluate(tiny_config(tiny_dataset, out), log=lambda _: None)
    for name in ("config.json", "history.json", "metrics.json", "curves.json", "checkpoints/final.pt",
                 "predictions/test.csv", "plots/train.json", "plots/val.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints" / "last.pt").exists()  # a completed run's checkpoint is final.pt
    saved = json.loads((out / "metrics.json").read_text())
    for key in FIGURES:
        assert 0.0 <= saved[key] <= 100.0, key
    assert saved["train_ms_per_image"] > 0 and saved["test_ms_per_image"] > 0
    assert saved["config"]["seed"] == 1 and "torch" in saved["environment"]
    assert saved["profile"] == "DA"  # 'auto' resolved to the method's profile and recorded
    history = json.loads((out / "history.json").read_text())
    assert [entry["epoch"] for entry in history["train"]] == [1, 2]
    assert [entry["epoch"] for entry in history["val"]] == [1, 2]
    # The saved maps re-score to the same numbers through the evaluator, as a user would.
    meta = read_split(tiny_dataset / "metadata", "SyntheticBoxes", "test")
    assert len(list((out / "scoremaps" / "test").rglob("*.npy"))) == len(meta)
    predictions = {line.split(",")[0]: int(line.split(",")[1])
                   for line in (out / "predictions" / "test.csv").read_text().splitlines()[1:]}
    rescored = evaluate_split(meta, lambda i: load_scoremap(out / "scoremaps" / "test", i, (64, 64)),
                              predictions=predictions, image_size=(64, 64)).to_dict()
    assert rescored["MaxBoxAccV2"] == pytest.approx(metrics["maxboxacc_v2"], abs=1e-9)
    assert rescored["Top-1 Loc"] == pytest.approx(metrics["top1_loc"], abs=1e-9)


class Interrupt(Exception):
    pass


def kill_after_first_epoch(line: str) -> None:
    if line.startswith("epoch 1/"):
        raise Interrupt


@pytest.mark.parametrize("uda", ["none", "mmd"])
def test_resume_after_a_kill_ends_with_the_uninterrupted_metrics(tiny_dataset, tmp_path, uda):
    whole = train_and_evaluate(tiny_config(tiny_dataset, tmp_path / "whole", uda=uda), log=lambda _: None)
    killed = tiny_config(tiny_dataset, tmp_path / "killed", uda=uda)
    with pytest.raises(Interrupt):
        train_and_evaluate(killed, log=kill_after_first_epoch)
    assert (tmp_path / "killed" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "killed" / "metrics.json").exists()
    resumed = train_and_evaluate(killed, resume=True, log=lambda _: None)
    for key in FIGURES:
        assert resumed[key] == whole[key], key
    if uda == "mmd":
        history = RunFolder(tmp_path / "whole").read_history()["train"]
        assert "L_d" not in history[0] and history[1]["valid_share"] > 0  # warm-up epoch, then DA-WSOL


def test_a_completed_run_whose_metrics_were_removed_trains_again_from_the_first_epoch(tiny_dataset, tmp_path):
    # What `dvc repro` does to a cell whose code changed: every output but the persisted checkpoints/
    # is removed, then `train --resume` runs. final.pt is never resumed from, so the run retrains.
    config = tiny_config(tiny_dataset, tmp_path / "run", epochs=1)
    train_and_evaluate(config, log=lambda _: None)
    for path in (tmp_path / "run").iterdir():
        if path.name != "checkpoints":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    lines: list[str] = []
    train_and_evaluate(config, resume=True, log=lines.append)
    assert not any(line.startswith("resuming") for line in lines) and any(line.startswith("epoch 1/1") for line in lines)
    assert RunFolder(tmp_path / "run").is_complete()


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`, with its bytes and modification time."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resume_with_other_settings_is_refused_naming_each_and_leaves_the_folder_untouched(tiny_dataset,
                                                                                             tmp_path):
    out = tmp_path / "killed"
    with pytest.raises(Interrupt):
        train_and_evaluate(tiny_config(tiny_dataset, out, uda="mmd", lambda1=0.3), log=kill_after_first_epoch)
    before = folder_state(out)
    changed = tiny_config(tiny_dataset, out, uda="mmd", lambda1=0.5, lr=0.02)
    with pytest.raises(WsolbenchError) as refused:
        train_and_evaluate(changed, resume=True, log=lambda _: None)
    assert str(refused.value) == (f"{out / 'checkpoints' / 'last.pt'}: saved with lambda1=0.3, lr=0.01, this run "
                                  f"has lambda1=0.5, lr=0.02; resume with the same settings")
    assert folder_state(out) == before
    # Runtime settings are no part of the identity: the same run resumes with another eval batch size.
    resumed = train_and_evaluate(tiny_config(tiny_dataset, out, uda="mmd", lambda1=0.3, eval_batch_size=5),
                                 resume=True, log=lambda _: None)
    assert resumed["run_id"] == RunFolder(out).read_config()["run_id"]


def test_restart_if_changed_starts_a_folder_of_other_settings_over_instead_of_refusing_it(tiny_dataset, tmp_path):
    # The pipeline's cells: killed, then their params changed, DVC reruns them with the new settings.
    out = tmp_path / "killed"
    with pytest.raises(Interrupt):
        train_and_evaluate(tiny_config(tiny_dataset, out, uda="mmd", lambda1=0.3), log=kill_after_first_epoch)
    lines: list[str] = []
    metrics = train_and_evaluate(tiny_config(tiny_dataset, out, uda="mmd", lambda1=0.5), resume=True,
                                 restart_if_changed=True, log=lines.append)
    assert any(line.startswith("starting over at epoch 1: ") and "lambda1=0.3" in line for line in lines), lines
    assert not any(line.startswith("resuming") for line in lines)
    assert metrics["identity"]["lambda1"] == 0.5
    assert [entry["epoch"] for entry in RunFolder(out).read_history()["train"]] == [1, 2]


def kill_at_start(line: str) -> None:
    if line.startswith("run "):
        raise Interrupt


def test_a_resume_into_another_runs_folder_without_a_checkpoint_is_refused(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):  # killed in its first epoch: config.json only
        train_and_evaluate(tiny_config(tiny_dataset, out, seed=2), log=kill_at_start)
    assert [p.name for p in out.iterdir()] == ["config.json"]
    before = folder_state(out)
    with pytest.raises(WsolbenchError, match=rf"^{out / 'config.json'}: saved with seed=2, this run has seed=1; "):
        train_and_evaluate(tiny_config(tiny_dataset, out, seed=1), resume=True, log=lambda _: None)
    assert folder_state(out) == before


def test_same_seed_same_metrics(tiny_dataset, tmp_path):
    first = train_and_evaluate(tiny_config(tiny_dataset, tmp_path / "a", epochs=1), log=lambda _: None)
    second = train_and_evaluate(tiny_config(tiny_dataset, tmp_path / "b", epochs=1), log=lambda _: None)
    assert {k: first[k] for k in FIGURES} == {k: second[k] for k in FIGURES}


def test_mask_dataset_trains_and_reports_pxap(tiny_dataset, tmp_path):
    metrics = train_and_evaluate(tiny_config(tiny_dataset, tmp_path / "m", dataset="SyntheticMasks", epochs=1),
                                 log=lambda _: None)
    assert 0 <= metrics["pxap"] <= 100 and 0 <= metrics["piou"] <= 100


def test_a_missing_image_fails_before_training_naming_it(tiny_dataset, tmp_path):
    broken = tmp_path / "data"
    import shutil
    shutil.copytree(tiny_dataset, broken)
    victim = sorted((broken / "images" / "val").rglob("*.png"))[1]
    victim.unlink()
    with pytest.raises(WsolbenchError, match=rf"{victim}: image file does not exist"):
        train_and_evaluate(tiny_config(broken, tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_an_unreadable_image_is_named(tiny_dataset, tmp_path):
    import shutil
    broken = tmp_path / "data"
    shutil.copytree(tiny_dataset, broken)
    victim = sorted((broken / "images" / "train").rglob("*.png"))[0]
    victim.write_bytes(b"not a png")
    with pytest.raises(WsolbenchError, match=rf"{victim}: unreadable image"):
        train_and_evaluate(tiny_config(broken, tmp_path / "run"), log=lambda _: None)


def test_an_unknown_method_lists_the_known_ones(tiny_dataset, tmp_path):
    with pytest.raises(WsolbenchError, match=r"unknown method 'gradcam'; available: .*cam"):
        train_and_evaluate(tiny_config(tiny_dataset, tmp_path / "run", method="gradcam"), log=lambda _: None)


def test_an_existing_run_folder_is_not_overwritten(tiny_dataset, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(WsolbenchError, match="exists and is not empty"):
        train_and_evaluate(tiny_config(tiny_dataset, tmp_path / "run"), log=lambda _: None)


def test_pretrained_imagenet_without_a_local_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))
    with pytest.raises(WsolbenchError, match="resnet18-f37072fd.pth"):
        build_backbone("resnet18", pretrained="imagenet")


def test_scoring_uses_the_ground_truth_class_map(tiny_dataset, tmp_path):
    """The map scored is the GT class's (spec §1.5), whatever the model predicts."""
    from wsolbench.experiment import Run

    run = Run(tiny_config(tiny_dataset, tmp_path / "run"), log=lambda _: None)
    seen: list[torch.Tensor] = []
    original = run.model.predict

    def recording_predict(images, classes):
        seen.append(classes.clone())
        return original(images, classes)

    run.model.predict = recording_predict
    run.score(run.test_set)
    labels = [run.test_meta.class_labels[i] for i in run.test_meta.image_ids]
    assert torch.cat(seen).tolist() == labels
