"""WSOL backbones (spec §3): feature extractors registered by name, one module per family.

    backbone = build_backbone("resnet50", variant="cam", large_feature_map=True,
                              pretrained="imagenet")
    features, taps = backbone(images, taps=())        # F: (B, C, h, w), C = backbone.out_channels

A backbone is the trunk only. The heads (fc, 1×1 classifiers, ACoL/SPG branches) belong to the
method modules, which is why `lr_multiplier` never sees a classifier parameter.

`variant` picks the trunk a method needs (spec §3, §4.3–4.5):
    "cam"   CAM, HaS, CutMix (and the DA-WSOL extractor, spec §5.1)
    "acol"  the trunk ACoL puts its two heads on
    "spg"   the SPG trunk, with taps "SPG_A1" / "SPG_A2" for the B1 / B2 branches
    "adl"   as "cam", with named insert points where the ADL layers go

Adding a family touches one new file: a builder function decorated with `@register_backbone`
(timm style) and imported at the bottom of this module.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping, Sequence

from torch import Tensor, nn

from wsolbench.errors import WsolbenchError

VARIANTS = ("cam", "acol", "spg", "adl")
LR_PROFILES = ("WE", "DA")
# Where a method's own parameters never go: modules passed in `insert` live under this name,
# outside the pretrained trunk's numbering, so ImageNet weights load by their torchvision names.
INSERTED_MODULES = "inserted"


class Backbone(nn.Module):
    """A WSOL trunk: `forward(x, taps)` returns the feature map F and the requested taps.

    Attributes set by every family:
        name              registry name ("resnet50", "vgg16", ...)
        family            "resnet", "vgg" or "inception"
        variant           one of VARIANTS
        large_feature_map spec §3: the 28×28 (at 224 px) instead of 14×14 layout
        out_channels      C of F, the map the CAM weights apply to
        tap_names         intermediate outputs `forward` can return, by name
        tap_channels      channel count of each tap
        insert_points     names after which modules passed in `insert` are applied
        pretrained_info   `PretrainedInfo` of the weight file loaded, or None
        head_width_scale  width of this trunk over the spec's trunk of its family (1.0 for the
                          spec's backbones), which scales the ACoL/SPG heads (`head_width`)
    """

    family: str = ""
    imagenet_weight_url: str = ""  # torchvision's IMAGENET1K_V1 URL; only its file name is used
    # Prefix of the pretrained classifier in the ImageNet file, kept in pretrained_info.fc_state
    # for the profile that loads the 1000-class fc (spec §3.1, §8 item 20). None: not usable.
    pretrained_fc_prefix: str | None = None

    def __init__(self, *, name: str, variant: str, large_feature_map: bool):
        super().__init__()
        if variant not in VARIANTS:
            raise WsolbenchError(f"unknown backbone variant {variant!r}; expected one of {VARIANTS}")
        self.name = name
        self.variant = variant
        self.large_feature_map = bool(large_feature_map)
        self.out_channels: int = 0
        self.head_width_scale: float = 1.0
        self.tap_names: tuple[str, ...] = ()
        self.tap_channels: dict[str, int] = {}
        self.insert_points: tuple[str, ...] = ()
        # insert point -> the trunk module it follows; inserted parameters get that module's
        # learning-rate group, as they would inside the reference's layer lists.
        self.insert_hosts: dict[str, str] = {}
        # Parameters that are new in WSOL (conv6, SPG_A3_*, ...): initialized, never loaded.
        self.new_layer_prefixes: tuple[str, ...] = ()
        self.pretrained_info: PretrainedInfo | None = None  # set by load_pretrained
        self._parameter_names: frozenset[str] | None = None

    def head_width(self, spec_width: int) -> int:
        """The width of a method head the spec gives for its family's own trunk, on this trunk.

        wsolbench decision (the spec sizes ACoL's and SPG's heads for ResNet50, VGG16 and
        InceptionV3 only, §4.3–4.4): on a narrower trunk of a family (resnet18, resnet10_half) a
        head keeps the spec's ratio to the trunk, spec_width x head_width_scale, so ACoL's heads
        on ResNet50 are C/2 wide on every ResNet. The spec's backbones have scale 1: unchanged.
        """
        return max(1, round(spec_width * self.head_width_scale))

    # --- built by the families ------------------------------------------------------------
    def _attach_inserted(self, insert: Mapping[str, nn.Module] | None) -> None:
        """Keep the caller's modules in a ModuleDict applied in forward (after the init)."""
        insert = dict(insert or {})
        unknown = sorted(set(insert) - set(self.insert_points))
        if unknown:
            raise ValueError(
                f"{self.name} variant {self.variant!r} has no insert point(s) {unknown}; "
                f"its insert points are {self.insert_points}"
            )
        self.inserted = nn.ModuleDict(insert)

    def _after(self, insert_point: str, x: Tensor) -> Tensor:
        """Apply the module inserted at `insert_point`, if any."""
        module = self.inserted[insert_point] if insert_point in self.inserted else None
        return x if module is None else module(x)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """F and every tap of this variant; implemented by each family."""
        raise NotImplementedError

    def _trunk_lr_multiplier(self, param_name: str, profile: str) -> float:
        """The family's LR-group rule for a trunk parameter name (spec §3.1–3.3)."""
        raise NotImplementedError

    # --- the interface the methods use ----------------------------------------------------
    def forward(self, x: Tensor, taps: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        """Return F (B, C, h, w) and the requested intermediate outputs by name."""
        if isinstance(taps, str):
            taps = (taps,)
        unknown = [name for name in taps if name not in self.tap_names]
        if unknown:
            raise KeyError(
                f"{self.name} variant {self.variant!r} has no tap(s) {unknown}; "
                f"its taps are {self.tap_names}"
            )
        features, all_taps = self._forward_features(x)
        return features, {name: all_taps[name] for name in taps}

    def lr_multiplier(self, param_name: str, profile: str) -> float:
        """1.0 or 10.0: the LR group of a parameter (name relative to the backbone) in a profile.

        The ×10 group trains at lr · lr_classifier_ratio (spec §3, §6.1).
        """
        if profile not in LR_PROFILES:
            raise ValueError(f"unknown LR profile {profile!r}; expected one of {LR_PROFILES}")
        if self._parameter_names is None:
            self._parameter_names = frozenset(name for name, _ in self.named_parameters())
        if param_name not in self._parameter_names:
            raise KeyError(
                f"{param_name!r} is not a parameter of the {self.name} backbone "
                "(names are relative to the backbone, e.g. 'layer4.0.conv1.weight')"
            )
        prefix = INSERTED_MODULES + "."
        if param_name.startswith(prefix):
            insert_point, _, rest = param_name[len(prefix):].partition(".")
            param_name = f"{self.insert_hosts[insert_point]}.{insert_point}.{rest}"
        return self._trunk_lr_multiplier(param_name, profile)

    def pretrained_trunk_keys(self) -> list[str]:
        """State-dict keys that must come from a pretrained file (all but the new layers).

        `num_batches_tracked` counters are included but optional: the 2017-era torchvision
        files predate them.
        """
        skip = (INSERTED_MODULES + ".",) + self.new_layer_prefixes
        return [key for key in self.state_dict() if not key.startswith(skip)]

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, variant={self.variant!r}, "
            f"large_feature_map={self.large_feature_map}, out_channels={self.out_channels}"
        )


def initialize_weights(modules: Iterable[nn.Module], conv_init: str) -> None:
    """The reference's init (spec §3.1, §3.2): convs xavier-uniform or He, bias 0; BN 1, 0.

    He is kaiming-normal with fan_out (spec §3.2). Linear layers (none in a trunk) get N(0, 0.01).
    """
    for module in modules:
        if isinstance(module, nn.Conv2d):
            if conv_init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            elif conv_init == "he":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                raise ValueError(f"unknown conv init {conv_init!r}; expected 'xavier' or 'he'")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


BackboneBuilder = Callable[..., Backbone]
_BUILDERS: dict[str, BackboneBuilder] = {}


def register_backbone(builder: BackboneBuilder) -> BackboneBuilder:
    """Register `builder(*, variant, large_feature_map, insert) -> Backbone` under its name."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"backbone {name!r} is registered twice")
    _BUILDERS[name] = builder
    return builder


def available_backbones() -> tuple[str, ...]:
    """The registered backbone names, sorted."""
    return tuple(sorted(_BUILDERS))


def build_backbone(
    name: str,
    *,
    variant: str = "cam",
    large_feature_map: bool = True,
    pretrained: str | os.PathLike = "none",
    insert: Mapping[str, nn.Module] | None = None,
) -> Backbone:
    """Build a registered backbone, initialize it, then load `pretrained` into its trunk.

    pretrained: "none" (the spec's init only), "imagenet" (torchvision's V1 file from its local
    cache, never downloaded), or the path of a state dict (.pth).
    """
    if name not in _BUILDERS:
        raise WsolbenchError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    if variant not in VARIANTS:
        raise WsolbenchError(f"unknown backbone variant {variant!r}; expected one of {VARIANTS}")
    backbone = _BUILDERS[name](variant=variant, large_feature_map=large_feature_map, insert=insert)
    # Spec §3.1: the init happens in the constructor, before the pretrained load.
    load_pretrained(backbone, pretrained)
    return backbone


# The families register themselves on import; they import Backbone from above.
from wsolbench.methods.backbones.pretrained import PretrainedInfo, load_pretrained  # noqa: E402
from wsolbench.methods.backbones import inception, resnet, vgg  # noqa: E402,F401

__all__ = [
    "Backbone",
    "LR_PROFILES",
    "PretrainedInfo",
    "VARIANTS",
    "available_backbones",
    "build_backbone",
    "initialize_weights",
    "load_pretrained",
    "register_backbone",
]
