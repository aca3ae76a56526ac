"""The paper settings as params files: CUB / ILSVRC / OpenImages x ResNet50 / InceptionV3 / VGG16.

    wsolbench setting --list
    wsolbench setting cub-resnet50 --data-root /data/CUB_200_2011/images
    wsolbench setting openimages-resnet50 --data-root /data/OpenImages --mask-root /data/OpenImages-masks

writes params.yaml for `dvc repro`: the same pipeline as the embedded default, on the local image folders
named once in the run config. A setting names only what differs from the defaults — dataset, backbone,
the folders, ImageNet weights — and the recipe of every run (epochs, lr, schedule, wd, feature-map
size, lambdas) then comes from the one config system's recipe table (harness/config.py: spec §6.2 for
profile DA, §6.3 for profile WE), so the numbers are written down once. VGG16 has a DA-WSOL recipe on
CUB only (DA24, spec §6.2); its ILSVRC and OpenImages settings run profile WE (§6.3) for every method,
with DA-WSOL's lambdas at their defaults (a wsolbench decision, stated in the file it writes).

Every setting file is rendered from one template, so they cannot drift apart; `--print` shows one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from wsolbench import atomic
from wsolbench.errors import WsolbenchError

METHODS = ("cam", "has", "acol", "spg", "adl", "cutmix")
BACKBONES = {"resnet50": "ResNet50", "inception_v3": "InceptionV3", "vgg16": "VGG16"}
DATASETS = {"cub": "CUB", "ilsvrc": "ILSVRC", "openimages": "OpenImages"}
# What --data-root is for each dataset: the folder the packaged metadata's image ids are relative to.
DATA_ROOT_HELP = {
    "CUB": "CUB_200_2011/images (ids <class folder>/<file>.jpg)",
    "ILSVRC": "the ImageNet root holding train/<wnid>/, val/ (ImageNet val, the test split) and val2/ "
              "(ImageNetV2, the val split)",
    "OpenImages": "the OpenImages30k root holding train/, val/ and test/ (ids <split>/<class>/<file>.jpg)",
}


@dataclass(frozen=True)
class Setting:
    name: str  # e.g. cub-resnet50
    dataset: str  # CUB, ILSVRC, OpenImages
    backbone: str  # a registry backbone name
    profile: str  # "auto" (each method's first profile, spec §4.7) or "WE"

    @property
    def needs_masks(self) -> bool:
        return self.dataset == "OpenImages"  # its val/test localization is masks (spec §1.2)

    @property
    def title(self) -> str:
        return f"{self.dataset} {BACKBONES[self.backbone]}"


def _profile(dataset: str, backbone: str) -> str:
    # No DA-WSOL recipe for VGG16 beyond CUB (spec §6.2): WE's schedule (§6.3) for every method there.
    return "WE" if backbone == "vgg16" and dataset != "CUB" else "auto"


SETTINGS: dict[str, Setting] = {
    f"{key}-{backbone.replace('_', '')}": Setting(f"{key}-{backbone.replace('_', '')}", dataset, backbone,
                                                  _profile(dataset, backbone))
    for key, dataset in DATASETS.items() for backbone in BACKBONES
}

_TEMPLATE = """\
# The paper setting {name}: {title} (spec §6.2-6.3), written by `wsolbench setting {name}`.
# The same pipeline as the embedded default (dvc.yaml), on local images: `dvc repro` checks them, records
# the ImageNet weights, trains the matrix, runs the lambda study and collects everything into the store.
# The recipe of every run (epochs, lr and its decay, wd, feature-map size, lambdas) comes from the recipe
# table of the config system for (dataset, backbone, profile):
#   {profile_note}
# Expected GPU hours per setting: the README's table. `git checkout params.yaml` returns to the default.

# Check every image (and mask) under config.data_root, write the metadata into prepare.out.
prepare:
  dataset: {dataset}
  out: data/{dataset}

# torchvision's ImageNet weights for config.backbone, from its local cache (torch.hub.get_dir()/checkpoints;
# never downloaded): recorded, not trained.
pretrain:
  weights: imagenet
  config: {{}}

# Every run of the pipeline (train matrix, study trials, the best pair): TrainConfig fields over the recipe.
config:
  dataset: {dataset}
  data_root: {data_root}
  metadata_root: data/{dataset}/metadata
  mask_root: {mask_root}
  backbone: {backbone}
  pretrained: imagenet
  profile: {profile}

train:
  methods: [{methods}]
  udas: [none, mmd]
  seeds: [0]

# The lambda study on val (each trial a full-recipe run: see the GPU hours before raising n_trials).
tune:
  method: cam
  uda: mmd
  seed: 0
  n_trials: 8
  lambda1_range: [0.03, 3.0]
  lambda2_range: [0.1, 10.0]
  sampler_seed: 0

plots:
  val_y: {val_y}
"""


def _yaml_path(path: str | os.PathLike | None) -> str:
    if path is None:
        return "null"
    text = os.fspath(path)
    # Quoted where plain YAML would read it as something else (a colon, a leading special character...).
    if not text or any(c in text for c in ":#'\"{}[],&*!|>%@`") or text != text.strip():
        return "'" + text.replace("'", "''") + "'"
    return text


def render(setting: Setting, data_root: str | os.PathLike, mask_root: str | os.PathLike | None) -> str:
    """The params file of a setting with its folders filled in."""
    if setting.profile == "WE":
        profile_note = ("spec §6.3, profile WE for every method (VGG16 has a DA-WSOL recipe on CUB only;\n"
                        "#   DA-WSOL's lambdas stay at their defaults).")
    else:
        profile_note = ("spec §6.2 for cam/has/adl/cutmix (profile DA, with and without DA-WSOL), §6.3 for\n"
                        "#   acol/spg (profile WE, their only one; spec §4.7).")
    return _TEMPLATE.format(
        name=setting.name, title=setting.title, dataset=setting.dataset, backbone=setting.backbone,
        profile=setting.profile, profile_note=profile_note, data_root=_yaml_path(data_root),
        mask_root=_yaml_path(mask_root), methods=", ".join(METHODS),
        val_y="pxap" if setting.needs_masks else "maxboxacc_v2")


def setting_named(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise WsolbenchError(f"no paper setting {name!r} (settings: {', '.join(SETTINGS)})") from None


def _written_unedited(text: str) -> bool:
    """Whether a params file is exactly what `wsolbench setting` wrote (some setting, its own folders)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    first = text.split("\n", 1)[0]
    name = first.removeprefix("# The paper setting ").split(":", 1)[0]
    if name not in SETTINGS:
        return False
    try:
        config = (YAML(typ="safe", pure=True).load(text) or {}).get("config") or {}
    except (YAMLError, AttributeError):
        return False
    return text == render(SETTINGS[name], config.get("data_root") or "", config.get("mask_root"))


def _unmodified_in_git(path: Path) -> bool:
    import subprocess

    folder = str(path.resolve().parent)
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=folder,
                                 capture_output=True).returncode == 0
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path.name], cwd=folder,
                               capture_output=True).returncode == 0
    except OSError:  # no git on the machine
        return False
    return tracked and clean


def write_setting(name: str, data_root: str | os.PathLike, mask_root: str | os.PathLike | None,
                  out: str | os.PathLike, force: bool = False) -> Path:
    """Write the setting's params file to `out` (atomically), after checking the folders exist. An
    existing `out` is replaced only if nothing of the user's would be lost: it is committed and unmodified
    in git, or exactly what this command wrote, or `force`."""
    setting = setting_named(name)
    out = Path(out)
    if out.exists() and not force and not _unmodified_in_git(out) and not _written_unedited(
            out.read_text(encoding="utf-8", errors="replace")):
        raise WsolbenchError(f"{out}: has edits of your own (not committed, not as `wsolbench setting` wrote it); "
                             f"commit them or pass --force to replace the file")
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise WsolbenchError(f"{data_root}: no such folder (--data-root is {DATA_ROOT_HELP[setting.dataset]})")
    if setting.needs_masks and mask_root is None:
        raise WsolbenchError(f"{setting.name}: {setting.dataset}'s val and test splits are masks: pass --mask-root, "
                             f"the folder the metadata's mask paths (<split>/<class>/<file>.png) are relative to")
    if mask_root is not None and not Path(mask_root).is_dir():
        raise WsolbenchError(f"{mask_root}: no such folder (--mask-root)")
    # Absolute, so the file means the same from the repository root, where DVC runs every stage.
    text = render(setting, data_root.resolve(), Path(mask_root).resolve() if mask_root is not None else None)
    return atomic.write_text(out, text)
