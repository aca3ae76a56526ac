"""`wsolbench train` as a user runs it: a flag per config field, the same checks for flags and TOML
keys, and --dry-run (one JSON object on stdout, nothing written, the run_id a real run writes)."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from wsolbench.cli import build_parser, main
from wsolbench.config import DERIVED_FIELDS, TrainConfig, flag_for
from wsolbench.datasets import synthetic
from wsolbench.runfolder import RunFolder


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.generate(root, seed=3, num_classes=3, train_per_class=8, val_per_class=3, test_per_class=3)
    return root


def tiny_args(data: Path, out: Path) -> list[str]:
    return ["--dataset", "SyntheticBoxes", "--data-root", str(data / "images"), "--metadata-root",
            str(data / "metadata"), "--mask-root", str(data / "masks"), "--backbone", "resnet18",
            "--pretrained", "none", "--image-size", "64", "--epochs", "1", "--batch-size", "8",
            "--eval-batch-size", "16", "--workers", "0", "--lr", "0.01", "--device", "cpu", "--seed", "1",
            "--source-samples", "4", "--target-samples", "4", "--start-epoch", "0", "--out", str(out)]


def without(argv: list[str], *flags: str) -> list[str]:
    """`argv` less the given flags and their values."""
    kept = []
    for flag, value in zip(argv[::2], argv[1::2]):
        if flag not in flags:
            kept += [flag, value]
    return kept


def train(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_parser() -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["train"]


def test_every_config_field_has_a_train_flag_of_its_name_with_help():
    actions = {option: action for action in train_parser()._actions for option in action.option_strings}
    settable = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in DERIVED_FIELDS]
    assert DERIVED_FIELDS == ("recipe",)
    for name in settable:
        action = actions.get(flag_for(name))
        assert action is not None, f"no {flag_for(name)} flag for TrainConfig.{name}"
        assert action.dest == name and action.help, name
    assert flag_for("lr_classifier_ratio") == "--lr-classifier-ratio"
    assert flag_for("method_options") == "--method-option"  # the spelling scripts already use


def test_flags_and_toml_keys_of_the_same_names_give_the_same_run(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    settings = {"source-samples": ("5", "5"), "target-samples": ("6", "6"), "lr-classifier-ratio": ("2.5", "2.5"),
                "momentum": ("0.8", "0.8"), "eval-batch-size": ("7", "7"), "box-metric": ("v1", '"v1"'),
                "test-split": ("test", '"test"'), "assigner-mode": ("batched", '"batched"'),
                "precision": ("bf16", '"bf16"')}
    flags = [item for flag, (text, _) in settings.items() for item in (f"--{flag}", text)]
    base = without(tiny_args(tiny_dataset, out), *(f"--{flag}" for flag in settings))
    code, printed, err = train([*base, *flags, "--no-save-scoremaps", "--no-domain-loss",
                                "--no-large-feature-map", "--method", "has", "--method-option", "drop_rate=0.25", "--dry-run"],
                               capsys)
    assert code == 0, err
    from_flags = json.loads(printed)
    toml = tmp_path / "run.toml"
    toml.write_text("".join(f"{flag.replace('-', '_')} = {literal}\n" for flag, (_, literal) in settings.items())
                    + 'save_scoremaps = false\nuse_domain_loss = false\nlarge_feature_map = false\nmethod = "has"\n'
                    + "[method_options]\ndrop_rate = 0.25\n")
    code, printed, err = train([*base, "--config", str(toml), "--dry-run"], capsys)
    assert code == 0, err
    from_toml = json.loads(printed)
    assert from_flags["config"] == from_toml["config"] and from_flags["run_id"] == from_toml["run_id"]
    config = from_flags["config"]
    assert (config["source_samples"], config["target_samples"], config["lr_classifier_ratio"], config["momentum"],
            config["eval_batch_size"], config["box_metric"], config["assigner_mode"], config["precision"]) == \
        (5, 6, 2.5, 0.8, 7, "v1", "batched", "bf16")
    assert config["save_scoremaps"] is False and config["use_domain_loss"] is False
    assert config["large_feature_map"] is False and config["method_options"] == {"drop_rate": 0.25}
    assert not out.exists()


# (field, its text on the command line, its TOML literal, what the error says of it)
BAD_VALUES = [
    ("assigner_mode", "fast", '"fast"', "must be one of sequential, batched (got 'fast')"),
    ("epochs", "abc", '"abc"', "must be an integer (got 'abc')"),
    ("lambda1", "-1", "-1", "must be >= 0 (got -1"),
    ("cam_curve_interval", "1.5", "1.5", "must be in (0, 1) (got 1.5)"),
    ("source_samples", "0", "0", "must be positive (got 0)"),
    ("box_metric", "v3", '"v3"', "must be one of v1, v2 (got 'v3')"),
    ("lr", "nan", "nan", "must be a finite number (got nan)"),
]


@pytest.mark.parametrize("name, text, literal, message", BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_a_bad_flag_value_is_a_one_line_error_naming_the_flag(tmp_path, capsys, name, text, literal, message):
    code, printed, err = train(["--dataset", "SyntheticBoxes", "--data-root", "images", "--out",
                                str(tmp_path / "run"), flag_for(name), text], capsys)
    assert code == 2 and printed == ""
    assert err.count("\n") == 1 and err.startswith(f"wsolbench: error: {flag_for(name)} {message}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, text, literal, message", [
    *BAD_VALUES, ("use_domain_loss", None, '"no"', "must be true or false (got 'no')"),
    ("profile", None, "3", "must be a string (got 3)"),
    ("method_options", None, "{ when = 1979-05-27 }", "has when=datetime.date(1979, 5, 27): option values must be")],
    ids=[*(case[0] for case in BAD_VALUES), "bool", "type", "option"])
def test_the_same_bad_value_in_toml_is_a_one_line_error_naming_file_line_and_key(tmp_path, capsys, name, text,
                                                                                   literal, message):
    toml = tmp_path / "run.toml"
    toml.write_text(f'seed = 3\n{name} = {literal}\nmethod = "cam"\n')
    code, printed, err = train(["--dataset", "SyntheticBoxes", "--data-root", "images", "--out",
                                str(tmp_path / "run"), "--config", str(toml)], capsys)
    assert code == 2 and printed == ""
    assert err.count("\n") == 1 and err.startswith(f"wsolbench: error: {toml}:2: {name} {message}")
    assert not (tmp_path / "run").exists()


# The same values in a YAML section (`--config params.yaml:KEY.PATH`, the pipeline's way): YAML's own
# literals where TOML's differ (.nan), the same message, naming the file and the key's line.
YAML_BAD_VALUES = [(name, {"lr": ".nan"}.get(name, text), message) for name, text, _, message in BAD_VALUES] + [
    ("use_domain_loss", '"no"', "must be true or false (got 'no')"), ("profile", "3", "must be a string (got 3)")]


@pytest.mark.parametrize("name, literal, message", YAML_BAD_VALUES, ids=[case[0] for case in YAML_BAD_VALUES])
def test_the_same_bad_value_in_a_yaml_section_is_a_one_line_error_naming_file_line_and_key(tmp_path, capsys, name,
                                                                                            literal, message):
    params = tmp_path / "params.yaml"
    params.write_text(f"train:\n  methods: [cam]\n  overrides:\n    seed: 3\n    {name}: {literal}\n")
    code, printed, err = train(["--dataset", "SyntheticBoxes", "--data-root", "images", "--out",
                                str(tmp_path / "run"), "--config", f"{params}:train.overrides"], capsys)
    assert code == 2 and printed == ""
    assert err.count("\n") == 1 and err.startswith(f"wsolbench: error: {params}:5: {name} {message}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, spec, message", [
    ("train:\n  methods: [cam]\n", "train.overrides", "{path}:1: has no key train.overrides"),
    ("train:\n  overrides: [1, 2]\n", "train.overrides", "{path}:2: train.overrides must be a mapping"),
    ("train:\n  overrides:\n    epoch: 3\n", "train.overrides", "{path}:3: unknown config key 'epoch'"),
    ("train:\n  overrides: {epochs: [1,\n", "train.overrides", "{path}:3: not valid YAML"),
], ids=["missing", "not-a-mapping", "unknown-key", "syntax"])
def test_a_yaml_section_that_cannot_be_read_is_a_one_line_error(tmp_path, capsys, text, spec, message):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    code, _, err = train(["--dataset", "SyntheticBoxes", "--data-root", "images", "--out", str(tmp_path / "run"),
                          "--config", f"{params}:{spec}"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"wsolbench: error: {message.format(path=params)}"), err


def test_a_yaml_section_gives_the_run_its_toml_twin_gives(tiny_dataset, tmp_path, capsys):
    base = tiny_args(tiny_dataset, tmp_path / "run")
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 0.005\nepochs = 2\nmethod = "has"\nuse_assigner = false\n[method_options]\ndrop_rate = 0.25\n')
    # YAML 1.2 as DVC reads params.yaml: 5e-3 is a number; null leaves a key to the recipe and the flags.
    params = tmp_path / "params.yaml"
    params.write_text("config:\n  lr: 5e-3\n  epochs: 2\n  method: has\n  use_assigner: false\n"
                      "  method_options: {drop_rate: 0.25}\n  mask_root: null\n")
    runs = []
    for spec in (str(toml), f"{params}:config"):
        code, printed, err = train([*without(base, "--lr", "--epochs"), "--config", spec, "--dry-run"], capsys)
        assert code == 0, err
        runs.append(json.loads(printed))
    assert runs[0]["config"] == runs[1]["config"] and runs[0]["run_id"] == runs[1]["run_id"]
    assert runs[1]["config"]["lr"] == 0.005 and runs[1]["config"]["method_options"] == {"drop_rate": 0.25}
    assert runs[1]["config"]["mask_root"] == str(tiny_dataset / "masks")  # the flag, not the null


def test_the_derived_recipe_name_cannot_be_set_from_toml(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('recipe = "mine"\n')
    code, _, err = train(["--dataset", "SyntheticBoxes", "--data-root", "images", "--out", str(tmp_path / "run"),
                          "--config", str(toml)], capsys)
    assert code == 2 and err.startswith(f"wsolbench: error: {toml}:1: recipe cannot be set")


def test_dry_run_prints_one_json_object_writes_nothing_and_predicts_the_run_id(tiny_dataset, tmp_path, capsys):
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "run"
    argv = [*tiny_args(tiny_dataset, out), "--pretrained", str(weights)]
    code, printed, err = train([*argv, "--dry-run"], capsys)
    assert code == 0, err
    assert printed.count("\n") == 1
    record = json.loads(printed)  # exactly one JSON document: json.loads fails on trailing text
    assert not out.exists()  # nothing written
    assert record["pretrained_sha256"] == sha256 and record["identity"]["pretrained_sha256"] == sha256
    assert "pretrained" not in record["identity"] and "out" not in record["identity"]
    assert record["config"]["out"] == str(out) and record["config"]["source_samples"] == 4
    assert len(record["run_id"]) == 16

    assert train([*argv, "--quiet"], capsys)[0] == 0
    folder = RunFolder(out)
    written, metrics = folder.read_config(), folder.read_metrics()
    assert written["run_id"] == metrics["run_id"] == record["run_id"]
    assert written["identity"] == metrics["identity"] == record["identity"]
    assert written["pretrained"]["sha256"] == metrics["pretrained_sha256"] == sha256  # spec §3.1: recorded
    assert isinstance(written["command"], list) and "code" in written and "code" in metrics

    # A dry run refuses what the run would refuse, still writing nothing.
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    code, printed, err = train([*argv, "--dry-run"], capsys)
    assert code == 2 and printed == "" and "exists and is not empty (pass --resume" in err
    code, printed, err = train([*argv, "--dry-run", "--resume"], capsys)
    assert code == 2 and printed == "" and err == f"wsolbench: error: {out}: this run already completed\n"
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_dry_run_names_a_missing_image(tiny_dataset, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(tiny_dataset, broken)
    victim = sorted((broken / "images" / "test").rglob("*.png"))[0]
    victim.unlink()
    code, printed, err = train([*tiny_args(broken, tmp_path / "run"), "--dry-run"], capsys)
    assert code == 2 and printed == "" and err.count("\n") == 1
    assert err.startswith(f"wsolbench: error: {victim}: image file does not exist")
    assert not (tmp_path / "run").exists()


def test_dry_run_names_a_missing_pretrained_file(tiny_dataset, tmp_path, capsys):
    missing = tmp_path / "nowhere.pth"
    code, printed, err = train([*tiny_args(tiny_dataset, tmp_path / "run"), "--pretrained", str(missing),
                                "--dry-run"], capsys)
    assert code == 2 and printed == ""
    assert err == f"wsolbench: error: {missing}: pretrained weight file not found\n"
