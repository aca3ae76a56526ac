"""The one config system: plain values, from the spec's recipe, a config file, then command-line flags.

    config = resolve_config(cli_values={"dataset": "CUB", "method": "cam", ...}, config_file=None)

Precedence, lowest first: the dataclass defaults; the recipe for (dataset, backbone) (spec §6.2 for
profile DA, §6.3 for profile WE; wsolbench's own for the generated dataset); the config file (TOML,
or a YAML file or a section of one, e.g. the pipeline's `params.yaml:config`); flags.
The resolved config is printed into every run (config.json), with `recipe` naming what filled the
defaults. Every field has a train flag (`--field-name`) and a TOML key (`field_name`), checked by
the same rules (`field_problem`). Every field is either part of the run's identity (it changes the
results: `run_identity`, `run_id`) or runtime only (`RUNTIME_FIELDS`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, get_type_hints

from wsolbench.errors import InputError, WsolbenchError

UDA_CHOICES = ("none", "mmd", "dann")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("fp32", "bf16")
# The values a text field may take, checked alike from a flag, a TOML file or Python (and shown as
# the train flags' metavar).
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "uda": UDA_CHOICES, "profile": ("auto", "DA", "WE"), "assigner_mode": ("sequential", "batched"),
    "optimizer": ("sgd", "adamw"), "box_metric": ("v1", "v2"), "device": DEVICE_CHOICES,
    "precision": PRECISION_CHOICES}


@dataclass
class TrainConfig:
    # data
    dataset: str = ""
    data_root: str = ""
    metadata_root: str | None = None  # None: the real metadata shipped with wsolbench
    mask_root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # model
    method: str = "cam"
    method_options: dict[str, Any] = field(default_factory=dict)
    uda: str = "none"
    profile: str = "auto"  # "DA", "WE", or "auto": resolve_config stores the method's first (DA; WE for acol/spg)
    backbone: str = "resnet50"
    pretrained: str = "imagenet"
    large_feature_map: bool = True
    # DA-WSOL (spec §5)
    lambda1: float = 0.3
    lambda2: float = 0.3
    start_epoch: int = 0
    assigner_mode: str = "sequential"
    source_samples: int = 32  # n_s and n_t, the paper's n = 32 (spec §5.3)
    target_samples: int = 32
    use_domain_loss: bool = True
    use_universum_loss: bool = True
    use_assigner: bool = True
    # optimisation (spec §6.1)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay_frequency: int = 3
    lr_classifier_ratio: float = 10.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    optimizer: str = "sgd"  # "sgd" (the references: nesterov, spec §6.1) or "adamw" (not a reference)
    image_size: int = 224
    # evaluation (spec §2)
    eval_frequency: int = 1
    eval_batch_size: int = 32
    cam_curve_interval: float = 0.001
    box_metric: str = "v2"
    save_scoremaps: bool = True
    # runtime
    seed: int = 4
    device: str = "auto"
    workers: int = 2
    precision: str = "fp32"
    channels_last: bool = False
    out: str = ""
    recipe: str = ""

    def validate(self) -> "TrainConfig":
        """Check every field (type, choice set, range) as `field_problem` does for a TOML key; a
        TOML or Python int where a float is meant is then stored as that float."""
        problems = [f"{flag_for(name)} is required" for name in REQUIRED_FIELDS if getattr(self, name) == ""]
        for name in _FIELDS:
            if name in REQUIRED_FIELDS and getattr(self, name) == "":
                continue
            problem = field_problem(name, getattr(self, name))
            if problem:
                problems.append(f"{flag_for(name)} {problem}")
        if problems:
            raise WsolbenchError("; ".join(problems))
        # lr = 1 and lr = 1.0 are one setting: stored alike, they give one run identity.
        for name, kind in _FIELD_TYPES.items():
            if kind is float:
                setattr(self, name, float(getattr(self, name)))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- checking values ----------------------------------------------------------------------------
# One set of rules for every field, whether its value comes from a flag, a TOML file or Python
# (DVC params, an Optuna trial): `field_problem` says what is wrong with one value.

REQUIRED_FIELDS = ("dataset", "data_root", "out")
# Not settable: `recipe` names the recipe that filled the defaults, so resolve_config derives it.
DERIVED_FIELDS = ("recipe",)
_FIELD_TYPES: dict[str, Any] = get_type_hints(TrainConfig)


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (_positive, "must be positive") for name in (
        "epochs", "batch_size", "image_size", "lr_decay_frequency", "eval_frequency", "eval_batch_size",
        "source_samples", "target_samples", "lr", "lr_classifier_ratio")},
    **{name: (_non_negative, "must be >= 0") for name in ("lambda1", "lambda2", "weight_decay", "workers")},
    "start_epoch": (lambda value: value >= -1, "must be >= -1 (-1: DA-WSOL from the first epoch)"),
    "momentum": (lambda value: 0 < value < 1, "must be in (0, 1) (nesterov SGD needs a momentum)"),
    # thresholds are numpy.arange(0, 1, interval) (spec §2)
    "cam_curve_interval": (lambda value: 0 < value < 1, "must be in (0, 1)"),
    "seed": (lambda value: 0 <= value < 2 ** 32, "must be in [0, 2**32) (numpy's seed range)"),
}
_NON_EMPTY = ("train_split", "val_split", "test_split", "method", "backbone", "pretrained")


def _type_problem(kind: Any, value: Any) -> str | None:
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if kind is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"
    if kind is str:
        return None if isinstance(value, str) else "must be a string"
    if kind == (str | None):
        return None if value is None or isinstance(value, str) else "must be a string"
    return None if isinstance(value, dict) else "must be a table of option = value"


def field_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` as the field `name` ("must be ... (got ...)"), or None."""
    problem = _type_problem(_FIELD_TYPES[name], value)
    if problem is None and name in FIELD_CHOICES and value not in FIELD_CHOICES[name]:
        problem = f"must be one of {', '.join(FIELD_CHOICES[name])}"
    elif problem is None and name in _NON_EMPTY and value == "":
        problem = "must not be empty"
    elif problem is None and isinstance(value, float) and not math.isfinite(value):
        problem = "must be a finite number"
    elif problem is None and name in _RANGES and not _RANGES[name][0](value):
        problem = _RANGES[name][1]
    elif problem is None and name == "method_options":
        # Plain values only: they are printed into config.json and hashed into the run identity.
        for option, option_value in value.items():
            if not isinstance(option_value, (str, int, float)) or (isinstance(option_value, float)
                                                                    and not math.isfinite(option_value)):
                return (f"has {option}={option_value!r}: option values must be finite numbers, strings or "
                        f"true/false")
    return None if problem is None else f"{problem} (got {value!r})"


def flag_for(name: str) -> str:
    """The train flag of a field: --field-name for field_name (method_options: --method-option)."""
    return "--method-option" if name == "method_options" else "--" + name.replace("_", "-")


def value_from_flag(name: str, text: str) -> Any:
    """The value a flag's text stands for. Text that is not a number where one is expected is
    kept as it is, so that validate() reports it as it reports the same value from a TOML file."""
    kind = _FIELD_TYPES[name]
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        pass
    return text


# ---- recipes -----------------------------------------------------------------------------------

# Spec §6.2: the official DA-WSOL scripts (batch 32, seed 4, nesterov SGD, classifier LR x10).
# The same recipe trains the baselines without DA-WSOL in profile DA.
_DA_RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("CUB", "resnet50"): dict(epochs=50, lr=1e-3, lr_decay_frequency=30, weight_decay=1e-4, large_feature_map=True,
                              lambda1=0.3, lambda2=2.0, start_epoch=0, eval_frequency=5),
    ("ILSVRC", "resnet50"): dict(epochs=10, lr=1e-5, lr_decay_frequency=3, weight_decay=1e-4, large_feature_map=True,
                                 lambda1=0.3, lambda2=3.0, start_epoch=0, eval_frequency=1),
    ("OpenImages", "resnet50"): dict(epochs=10, lr=1e-3, lr_decay_frequency=3, weight_decay=1e-4,
                                     large_feature_map=False, lambda1=0.2, lambda2=3.0, start_epoch=0, eval_frequency=1),
    ("CUB", "inception_v3"): dict(epochs=50, lr=2e-3, lr_decay_frequency=30, weight_decay=5e-4, large_feature_map=True,
                                  lambda1=1.4, lambda2=4.0, start_epoch=5, eval_frequency=5),
    ("ILSVRC", "inception_v3"): dict(epochs=10, lr=1e-3, lr_decay_frequency=3, weight_decay=5e-4,
                                     large_feature_map=True, lambda1=0.1, lambda2=0.3, start_epoch=0, eval_frequency=1),
    ("OpenImages", "inception_v3"): dict(epochs=10, lr=1e-3, lr_decay_frequency=3, weight_decay=5e-4,
                                         large_feature_map=True, lambda1=0.1, lambda2=0.5, start_epoch=0,
                                         eval_frequency=1),
    # DA24's VGG variant (informative only in the spec, but the only VGG DA-WSOL recipe there is).
    ("CUB", "vgg16"): dict(epochs=50, lr=1.7e-5, lr_decay_frequency=15, weight_decay=5e-4, large_feature_map=False,
                           lambda1=0.2, lambda2=0.1, start_epoch=10, eval_frequency=5, seed=15),
}

# Spec §6.3: the wsolevaluation schedules; learning rates are tuned per method (spec §4.7).
_WE_SCHEDULES = {"ILSVRC": dict(epochs=10, lr_decay_frequency=3), "CUB": dict(epochs=50, lr_decay_frequency=15),
                 "OpenImages": dict(epochs=10, lr_decay_frequency=3)}
# Spec §4.7 decision: a per-method learning rate comes only with the method options of its line
# (they were tuned as a pair), never with another source's defaults. Option names are the fields
# of each method's Options dataclass.
# Profile WE: unofficial third-party scripts that appear to copy wsolevaluation's tuned Google
# Sheet (spec §4.7, §9.10): unverified starting points.
_WE_TUNED_SOURCE = "third-party copy of the wsolevaluation sheet, unverified"
_WE_TUNED: dict[tuple[str, str, str], dict[str, Any]] = {
    ("CUB", "resnet50", "cam"): dict(lr=2.3222617e-4),
    ("CUB", "resnet50", "has"): dict(lr=3.61996526e-3, method_options=dict(grid_size=120, drop_rate=0.66)),
    ("CUB", "resnet50", "acol"): dict(lr=1.700073e-5, method_options=dict(erase_threshold=0.57)),
    ("CUB", "resnet50", "spg"): dict(lr=4.521947e-5, method_options=dict(h1=0.41, l1=0.35, h2=0.24, l2=0.21,
                                                                         h3=0.12, l3=0.08)),
    ("CUB", "resnet50", "adl"): dict(lr=1.253438325e-2, method_options=dict(gamma=0.76, drop_rate=0.24)),
    ("CUB", "resnet50", "cutmix"): dict(lr=3.333722e-4, method_options=dict(beta=1.35, prob=0.24)),
    ("ILSVRC", "resnet50", "cam"): dict(lr=3.108411e-5),
    ("ILSVRC", "vgg16", "cam"): dict(lr=1.654502e-5),
}
# Profile DA, CUB ResNet50: the author's follow-up BagCAMs (run_train.sh; spec §4.7 "BC" table),
# the wsolbench default for these baselines (spec §9.4). Each line is used whole: its lr, its
# method options and BagCAMs' schedule (decay every 15; its other settings equal spec §6.2's).
# BagCAMs ran every method with DA-WSOL (mmd), so the has/adl/cutmix lines hold with or without
# it. The cam line applies only without DA-WSOL: CAM + DA-WSOL is the official DA script (spec
# §6.2, lr 1e-3, decay 30), which BagCAMs' own DA-WSOL line (lr 0.001) agrees with.
_BC_SOURCE = "BagCAMs run_train.sh, informative"
_BC_TUNED: dict[tuple[str, str, str], dict[str, Any]] = {
    ("CUB", "resnet50", "cam"): dict(lr=0.002248447, lr_decay_frequency=15),
    ("CUB", "resnet50", "has"): dict(lr=0.003619965, lr_decay_frequency=15,
                                     method_options=dict(grid_size=120, drop_rate=0.66)),
    ("CUB", "resnet50", "adl"): dict(lr=0.012534383, lr_decay_frequency=15,
                                     method_options=dict(gamma=0.76, drop_rate=0.24)),
    ("CUB", "resnet50", "cutmix"): dict(lr=0.002251717, lr_decay_frequency=15,
                                        method_options=dict(beta=1.35, prob=0.34)),
}
_BC_WITHOUT_DA_WSOL_ONLY = ("cam",)


def _with_tuned(name: str, values: dict[str, Any], tuned: dict[str, Any] | None, source: str) -> tuple[str, dict]:
    """The recipe with one tuned line applied whole, its source named in the recipe name."""
    if tuned is None:
        return name, values
    values = {**values, **tuned, "method_options": dict(tuned.get("method_options", {}))}
    shown = ", ".join(f"{key} {value}" for key, value in
                      [*((k, v) for k, v in tuned.items() if k != "method_options"),
                       *tuned.get("method_options", {}).items()])
    return f"{name} + spec §4.7 ({shown}; {source})", values


# The generated dataset (wsolbench prepare synthetic): a miniature of the protocol that fine-tunes
# on two CPU cores in about half a minute. Its structure is the references' (spec §6.1-6.2): a
# backbone pretrained on a separate source task (SyntheticSource, `wsolbench pretrain`: ImageNet's
# role), fine-tuned with nesterov SGD, the classifier at x10, a step decay, and DA-WSOL active after
# one full epoch (start_epoch 0, as the CUB scripts) with the CUB weights (lambda 0.3 / 2).
# Feature maps: 128 px with the large feature map gives 16x16 = 256 pixels per map (the paper: 28x28
# = 784 with n = 32, so each target cluster must hold >= 4.1 % of a map to count for L_d); n = 10
# keeps that share (3.9 %). The backbone is a half-width ResNet10 (C = 256), where a ResNet18's step
# costs 3-7x as much (side by side, 2026-12-02).
# Schedule: 3 epochs, /10 for the last (lr_decay_frequency 3; CUB: 50, /10 for the last 21 of 50;
# ILSVRC: 10, /10 at 3, 6, 9), evaluated on val after every epoch (what the study's pruner reads).
# Why 3 and not the 6 epochs (/10 from 4) of before: the default pipeline's 20-minute budget
# (issue 9) — 6 epochs made it 35 minutes on 2 cores (benchmarks/RESULTS.md, 2026-12-02). Halving
# the epochs was chosen over halving the training images (the same number of steps) because it
# keeps the dataset, and with it every figure measured on it, and the number of images the
# assigner's anchors see per epoch; both were measured (RESULTS.md, 2026-12-03).
SYNTHETIC_DATASETS = ("SyntheticBoxes", "SyntheticMasks")
_SYNTHETIC_RECIPE: dict[str, Any] = dict(
    backbone="resnet10_half", image_size=128, large_feature_map=True, epochs=3, batch_size=32,
    optimizer="sgd", lr=1e-2, lr_classifier_ratio=10.0, lr_decay_frequency=3, weight_decay=1e-4,
    lambda1=0.3, lambda2=2.0, start_epoch=0, eval_frequency=1, eval_batch_size=64, cam_curve_interval=0.001,
    source_samples=10, target_samples=10, workers=2)
# Pretraining on the source task (classification only): CAM in profile WE (GAP, linear classifier)
# from scratch, every parameter at one learning rate. From random weights AdamW learns this in a
# few epochs where nesterov SGD would need far more; ImageNet's own recipe is not the point here,
# only a backbone that classifies the source task well (val top-1 is recorded: 96.0 % after these
# 8 epochs, /10 from epoch 6; 97.5 % after the 12, /10 from 9, used before the 20-minute budget).
# At the WSOL runs' image size; the large feature map off (output stride 16), as ImageNet
# weights are trained at a coarser stride than WSOL fine-tunes them at (spec §3.1).
SOURCE_DATASET = "SyntheticSource"
_SYNTHETIC_SOURCE_RECIPE: dict[str, Any] = dict(
    method="cam", uda="none", backbone="resnet10_half", pretrained="none", image_size=128,
    large_feature_map=False, epochs=8, batch_size=32, optimizer="adamw", lr=2e-3, lr_classifier_ratio=1.0,
    lr_decay_frequency=6, weight_decay=1e-4, eval_batch_size=64, workers=2)


def recipe_for(dataset: str, backbone: str, profile: str, method: str,
               uda: str = "none") -> tuple[str, dict[str, Any]]:
    """(name, values) of the recipe behind the defaults of a run; `values` may hold method_options.

    `profile` is "DA" or "WE", already resolved (spec §4.7: "auto" is resolved before the lookup).
    """
    if profile not in ("DA", "WE"):
        raise ValueError(f"recipe_for needs a resolved profile (DA or WE), got {profile!r}")
    if dataset in SYNTHETIC_DATASETS:
        return "wsolbench synthetic miniature (fine-tune a source-pretrained backbone)", dict(_SYNTHETIC_RECIPE)
    if dataset == SOURCE_DATASET:
        return "wsolbench synthetic source task (pretraining)", dict(_SYNTHETIC_SOURCE_RECIPE)
    key = (dataset, backbone, method)
    if profile == "DA" and (dataset, backbone) in _DA_RECIPES:
        tuned = _BC_TUNED.get(key)
        if method in _BC_WITHOUT_DA_WSOL_ONLY and uda != "none":
            tuned = None
        return _with_tuned(f"spec §6.2 DA-WSOL {dataset} {backbone}", dict(_DA_RECIPES[dataset, backbone]),
                           tuned, _BC_SOURCE)
    if profile == "WE" and dataset in _WE_SCHEDULES:
        values = dict(_WE_SCHEDULES[dataset])
        values["weight_decay"] = 1e-4 if backbone.startswith("resnet") else 5e-4
        values["large_feature_map"] = backbone != "vgg16"
        return _with_tuned(f"spec §6.3 wsolevaluation {dataset} {backbone}", values, _WE_TUNED.get(key),
                           _WE_TUNED_SOURCE)
    return "defaults (no recipe for this dataset/backbone: set them)", {}


def resolve_profile(profile: str, method: str) -> str:
    """`auto` is the method's first profile (DA; WE for the WE-only acol/spg), spec §4.7."""
    if profile != "auto":
        return profile
    from wsolbench.methods import method_class  # the registry; imported here to keep config light

    return method_class(method).profiles[0]


# ---- resolution ----------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _line_of_key(text: str, key: str) -> int | None:
    """The line of a top-level `key = ...` (or of its `[key]` table) in TOML text, if found."""
    name = rf"""(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')"""
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"\s*\[\s*{name}\s*\]", line):
            return number
        in_table = in_table or line.lstrip().startswith("[")
        if not in_table and re.match(rf"\s*{name}\s*=", line):
            return number
    return None


def _check_file_values(values: dict[str, Any], line_of: Callable[[str], int | None], path: Path) -> None:
    """The checks of TrainConfig.validate, key by key, naming the file and line of a bad value."""
    for key, value in values.items():
        line = line_of(key)
        if key not in _FIELDS:
            raise InputError(path, f"unknown config key {key!r}", line)
        if key in DERIVED_FIELDS:
            raise InputError(path, f"{key} cannot be set: wsolbench derives it (the recipe that filled the "
                                   f"defaults)", line)
        problem = field_problem(key, value)
        if problem:
            raise InputError(path, f"{key} {problem}", line)


YAML_SUFFIXES = (".yaml", ".yml")


def split_config_spec(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """`--config FILE` (TOML, or YAML by its suffix) or `--config FILE.yaml:SECTION`, SECTION a dotted
    key path into the YAML document (`params.yaml:config`, `params.yaml:pretrain.config`)."""
    text = os.fspath(spec)
    head, sep, section = text.rpartition(":")
    if sep and Path(head).suffix in YAML_SUFFIXES:
        if not section:
            raise WsolbenchError(f"--config {text}: name the section after the colon (FILE.yaml:KEY.PATH)")
        return Path(head), section
    if sep and Path(head).suffix == ".toml":
        raise WsolbenchError(f"--config {text}: a :SECTION is read from YAML files only (a TOML file is read "
                             f"whole)")
    return Path(text), None


def _read_text(path: Path, kind: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "config file does not exist") from None
    except UnicodeDecodeError:
        raise InputError(path, f"not UTF-8 text, so not a {kind} file") from None
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None


def _plain(value: Any) -> Any:
    """A YAML value as the plain Python a TOML file gives (ruamel's round-trip types unwrapped)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if type(value).__name__ == "ScalarBoolean" or isinstance(value, bool):
        return bool(value)
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def read_yaml_section(path: Path, section: str | None) -> tuple[dict[str, Any], Callable[[str], int | None]]:
    """The mapping at `section` of a YAML file (the whole document without one) and each key's line.

    Read with ruamel.yaml's round-trip loader (YAML 1.2, as DVC reads and `dvc exp run -S` writes
    params.yaml, so `lr: 1e-3` is a number here as it is there), which keeps the line of every key.
    A key set to null (or left empty) is not set: the recipe's value stands, as when it is absent."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    text = _read_text(path, "YAML")
    try:
        node = YAML(typ="rt", pure=True).load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        raise InputError(path, f"not valid YAML ({error.problem or error.context})",
                         mark.line + 1 if mark is not None else None) from None
    except YAMLError as error:
        raise InputError(path, f"not valid YAML ({' '.join(str(error).split())[:200]})") from None

    def line_in(mapping: Any, key: Any) -> int | None:
        try:
            return mapping.lc.key(key)[0] + 1
        except (AttributeError, KeyError, TypeError):
            return None

    line = None
    keys = section.split(".") if section else []
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise InputError(path, f"has no key {'.'.join(keys[:depth + 1])} (from --config {path}:{section})", line)
        line = line_in(node, key)
        node = node[key]
    if node is None:  # `overrides:` with nothing under it
        node = {}
    if not isinstance(node, dict):
        where = section or "the document"
        raise InputError(path, f"{where} must be a mapping of config keys (field: value), found a "
                               f"{type(_plain(node)).__name__}", line)
    lines = {str(key): line_in(node, key) for key in node}
    values = {str(key): _plain(value) for key, value in node.items() if value is not None}
    return values, lines.get


def read_config_file(spec: str | os.PathLike) -> dict[str, Any]:
    """The config values of a `--config` file: a TOML file, a YAML file, or a section of one
    (`FILE.yaml:KEY.PATH`, see split_config_spec), every key checked as a flag is."""
    path, section = split_config_spec(spec)
    if path.suffix in YAML_SUFFIXES:
        values, line_of = read_yaml_section(path, section)
        _check_file_values(values, line_of, path)
        return values
    text = _read_text(path, "TOML")
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # Python 3.11's TOMLDecodeError has no lineno attribute; its message ends "(at line N, ...)".
        found = re.search(r"\(at line (\d+)", str(error))
        line = getattr(error, "lineno", None) or (int(found.group(1)) if found else None)
        raise InputError(path, f"not valid TOML ({str(error).split(' (at line')[0]})", line) from None
    _check_file_values(values, lambda key: _line_of_key(text, key), path)
    return values


def resolve_config(cli_values: dict[str, Any], config_file: str | os.PathLike | None = None) -> TrainConfig:
    """Merge recipe < file < flags (flags given as None are 'not set')."""
    file_values = read_config_file(config_file) if config_file else {}
    explicit = {k: v for k, v in cli_values.items() if v is not None}
    merged = {**file_values, **explicit}
    if "method_options" in file_values and "method_options" in explicit:
        merged["method_options"] = {**file_values["method_options"], **explicit["method_options"]}
    base = TrainConfig()
    dataset = merged.get("dataset", base.dataset)
    method = merged.get("method", base.method)
    uda = merged.get("uda", base.uda)
    profile = merged.get("profile", base.profile)
    if profile in ("auto", "DA", "WE") and isinstance(method, str) and method:  # else validate() says why
        profile = resolve_profile(profile, method)
        merged["profile"] = profile  # config.json records the resolved profile
    backbone = merged.get("backbone")
    recipe_name, recipe = "", {}
    if profile in ("DA", "WE"):
        recipe_name, recipe = recipe_for(dataset, backbone or base.backbone, profile, method, uda)
        if backbone is None and "backbone" in recipe:
            backbone = recipe["backbone"]
            recipe_name, recipe = recipe_for(dataset, backbone, profile, method, uda)
    values = {**recipe, **merged, "recipe": recipe_name}
    # The recipe's method options (a tuned pair, spec §4.7) are overridden one option at a time.
    values["method_options"] = {**recipe.get("method_options", {}), **merged.get("method_options", {})}
    if backbone is not None:
        values["backbone"] = backbone
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise WsolbenchError(f"unknown config key(s): {', '.join(unknown)}")
    return TrainConfig(**values).validate()


# ---- run identity --------------------------------------------------------------------------------

# The fields that change what a run computes. Two runs with equal values (and the same pretrained
# weights) are the same experiment; a run may --resume only a folder of its own identity.
# `precision` is here: bf16 changes the numbers.
IDENTITY_FIELDS = (
    "dataset", "train_split", "val_split", "test_split", "method", "method_options", "uda", "profile",
    "backbone", "large_feature_map", "lambda1", "lambda2", "start_epoch", "assigner_mode", "source_samples",
    "target_samples", "use_domain_loss", "use_universum_loss", "use_assigner", "epochs", "batch_size", "lr",
    "lr_decay_frequency", "lr_classifier_ratio", "weight_decay", "momentum", "optimizer", "image_size",
    "eval_frequency", "cam_curve_interval", "box_metric", "seed", "precision")
# The fields that change how or where a run runs, not what it computes. The data, metadata and
# mask roots are locations, not content: a dataset moved to another disk is the same dataset (the
# dataset and split names stand for its content). `recipe` is a name derived from identity fields.
RUNTIME_FIELDS = ("data_root", "metadata_root", "mask_root", "out", "device", "workers", "eval_batch_size",
                  "save_scoremaps", "channels_last", "recipe")
# `pretrained` is a location too (a path, or "imagenet" for torchvision's cache): the identity holds
# the sha256 of the file it names instead (spec §3.1 asks for the hash of the weights used), so
# "imagenet" and the same file given by its path are one identity.
IDENTIFIED_BY_CONTENT = {"pretrained": "pretrained_sha256"}
# DA-WSOL's settings change nothing without DA-WSOL: a baseline (uda none) leaves them out of its
# identity, so the same CAM run is one run_id whatever lambda a params file carries beside it.
DA_WSOL_FIELDS = ("lambda1", "lambda2", "start_epoch", "assigner_mode", "source_samples", "target_samples",
                  "use_domain_loss", "use_universum_loss", "use_assigner")


def run_identity(config: TrainConfig, pretrained_sha256: str | None) -> dict[str, Any]:
    """The values that make a run what it is; `pretrained_sha256` is None when nothing is pretrained."""
    identity = {name: getattr(config, name) for name in IDENTITY_FIELDS
                if not (config.uda == "none" and name in DA_WSOL_FIELDS)}
    identity["method_options"] = dict(config.method_options)
    identity["pretrained_sha256"] = pretrained_sha256
    return identity


def run_id(identity: dict[str, Any]) -> str:
    """A stable name of an identity: the first 16 hex digits of the sha256 of its canonical JSON."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


def identity_change(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """'saved with a=1, b=2, this run has a=3, b=4' naming every value that differs, or None."""
    missing = object()
    keys = [*current, *(key for key in saved if key not in current)]
    differing = [key for key in keys if saved.get(key, missing) != current.get(key, missing)]
    if not differing:
        return None
    return (f"saved with {', '.join(f'{key}={saved.get(key)!r}' for key in differing)}, "
            f"this run has {', '.join(f'{key}={current.get(key)!r}' for key in differing)}")
