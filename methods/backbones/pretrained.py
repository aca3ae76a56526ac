"""Locating and loading ImageNet weights into a backbone's trunk (spec §3, §8 item 11).

wsolbench never downloads. "imagenet" means torchvision's IMAGENET1K_V1 file, looked up only in
torchvision's own cache, `torch.hub.get_dir()/checkpoints/<file name of the weight URL>`; any
other file is passed as a path. Every trunk tensor must come from the file; the rest of the file
(fc, AuxLogits, Mixed_7*, VGG's classifier) is dropped and reported. The file's sha256 is
recorded, because spec §3.1 asks for the hash of the weights used.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping
from urllib.parse import urlparse

import torch
from torch import Tensor

from wsolbench.errors import InputError, WsolbenchError

if TYPE_CHECKING:
    from wsolbench.methods.backbones import Backbone

logger = logging.getLogger(__name__)

# torch.hub names a checkpoint `<name>-<first hex digits of its sha256>.<ext>`.
_HASH_IN_FILE_NAME = re.compile(r"-([a-f0-9]{6,})\.")


@dataclass(frozen=True)
class PretrainedInfo:
    """The weight file a backbone was loaded from."""

    path: str
    sha256: str
    source: str  # "imagenet" (torchvision's cache) or "file" (a path given by the user)
    dropped_keys: tuple[str, ...]  # tensors in the file that are not part of the trunk
    # The file's pretrained classifier, prefix stripped ({"weight", "bias"}); empty where the
    # family's file has none a WSOL head could use. Spec §3.1: profile WE loads the 1000-class fc
    # on ILSVRC for cam/has/cutmix/adl.
    fc_state: Mapping[str, Tensor] = field(default_factory=dict, repr=False)

    def to_record(self) -> dict[str, object]:
        """Plain values for a run record (no tensors)."""
        return {"path": self.path, "sha256": self.sha256, "source": self.source,
                "dropped_keys": list(self.dropped_keys)}


def imagenet_weight_path(backbone: Backbone) -> Path:
    """Where torchvision's cache keeps the backbone's IMAGENET1K_V1 file."""
    file_name = os.path.basename(urlparse(backbone.imagenet_weight_url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_state_dict(path: Path) -> dict[str, object]:
    """torch.load the file as a flat {name: tensor} mapping, or raise a one-line InputError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "pretrained weight file not found") from None
    except Exception as error:  # pickle, zip and I/O errors all mean: not a readable state dict
        raise InputError(
            path,
            "not a readable PyTorch state dict, or a corrupt one "
            f"(torch.load raised {type(error).__name__}: {_one_line(error)[:200]})",
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
        raise InputError(
            path, f"expected a state dict (a mapping of names to tensors), got {type(state).__name__}"
        )
    return dict(state)


def weight_file(backbone: Backbone, pretrained: str | os.PathLike) -> tuple[Path, str] | None:
    """(path, source) of the file `pretrained` names for this backbone, checked to exist; None for
    "none". "imagenet" is torchvision's cached IMAGENET1K_V1 file, never downloaded."""
    if isinstance(pretrained, str) and pretrained == "none":
        return None
    if isinstance(pretrained, str) and pretrained == "imagenet":
        if not backbone.imagenet_weight_url:
            raise WsolbenchError(f"{backbone.name} has no ImageNet weights (it is wsolbench's own backbone): "
                                 f"pretrain it with `wsolbench pretrain` and pass --pretrained PATH, or --pretrained none")
        path = imagenet_weight_path(backbone)
        if not path.is_file():
            raise WsolbenchError(
                f"ImageNet weights for {backbone.name} not found: expected {path.name} in "
                f"{path.parent} (torchvision's cache, torch.hub.get_dir()/checkpoints); wsolbench "
                f"never downloads, so place the file there or pass --pretrained PATH"
            )
        return path, "imagenet"
    path = Path(pretrained)
    if not path.is_file():
        raise InputError(path, "pretrained weight file not found")
    return path, "file"


def load_pretrained(backbone: Backbone, pretrained: str | os.PathLike) -> None:
    """Load "none" / "imagenet" / a state-dict path into the trunk; set `pretrained_info`."""
    located = weight_file(backbone, pretrained)
    if located is None:
        backbone.pretrained_info = None
        return
    path, source = located
    sha256 = sha256_of_file(path)
    if source == "imagenet":
        # The cached file's name carries the start of its sha256: a truncated or corrupt
        # download is caught here rather than as a confusing unpickling error.
        match = _HASH_IN_FILE_NAME.search(path.name)
        if match and not sha256.startswith(match.group(1)):
            raise InputError(
                path,
                f"sha256 {sha256[:12]}... does not start with {match.group(1)} from the file name: "
                "the file is corrupt or incomplete; replace it or pass --pretrained PATH",
            )
    state = read_state_dict(path)
    dropped = load_trunk_tensors(backbone, state, path)

    fc_prefix = backbone.pretrained_fc_prefix
    fc_state = {}
    if fc_prefix:
        fc_state = {key[len(fc_prefix):]: value for key, value in state.items()
                    if key.startswith(fc_prefix) and isinstance(value, Tensor)}
    backbone.pretrained_info = PretrainedInfo(
        path=str(path), sha256=sha256, source=source, dropped_keys=tuple(dropped), fc_state=fc_state
    )
    if dropped:
        groups = sorted({key.split(".")[0] for key in dropped})
        logger.info("%s: loaded the %s trunk; dropped %d tensors not in it (%s)",
                    path, backbone.name, len(dropped), ", ".join(g + ".*" for g in groups))


def load_trunk_tensors(backbone: Backbone, state: Mapping[str, object], path: Path) -> list[str]:
    """Copy every trunk tensor from `state` (strict: all must be there, same shapes).

    Returns the keys of `state` that were not used. Keys match by torchvision's names: the
    families keep torchvision's module numbering (spec §3.2's "by order of conv index" mapping
    and §4.5's `align_layer` shift are not needed).
    """
    own = backbone.state_dict()
    wanted = backbone.pretrained_trunk_keys()
    missing = [key for key in wanted if key not in state and not key.endswith("num_batches_tracked")]
    if missing:
        raise InputError(
            path,
            f"lacks {len(missing)} of the {len(wanted)} tensors of the {backbone.name} trunk "
            f"(first: {missing[0]!r}); expected a torchvision {backbone.name} state dict",
        )
    to_load: dict[str, Tensor] = {}
    for key in wanted:
        if key not in state:  # an old file without num_batches_tracked: the counter stays 0
            continue
        value = state[key]
        if not isinstance(value, Tensor):
            raise InputError(path, f"entry {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(own[key].shape):
            raise InputError(
                path,
                f"tensor {key!r} has shape {tuple(value.shape)}, the {backbone.name} trunk needs "
                f"{tuple(own[key].shape)}; expected a torchvision {backbone.name} state dict",
            )
        to_load[key] = value
    result = backbone.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # to_load holds only own keys
    return sorted(key for key in state if key not in to_load)
