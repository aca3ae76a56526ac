"""The interface every WSOL method shares, and the classifier head most of them use.

A method is a small nn.Module built from a backbone and the number of classes. It offers:
  training_step(images, labels, progress) -> StepOutput   the loss of a batch, and what DA-WSOL reads
  logits(images)                                          classification at test time (eval mode)
  class_maps(images, classes)                             the raw CAM at feature resolution (spec §3.4)
  lr_multiplier(name, profile)                            its parameters' learning-rate group (spec §3)
It does not train, evaluate or write files. Its hyper-parameters are fields of its `Options`
dataclass with the spec's defaults. DA-WSOL wraps any method without the method knowing
(wsolbench.methods.dawsol.wrapper).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsolbench.errors import WsolbenchError
from wsolbench.methods.backbones import Backbone

if TYPE_CHECKING:
    from wsolbench.distributed import BatchShare

PROFILES = ("DA", "WE")
CLASSIFIER_LR_MULTIPLIER = 10.0  # lr_classifier_ratio in both references (spec §3, §6.2)


@dataclass
class TrainingProgress:
    """Where training is; DANN's gradient-reversal schedule reads it (spec §5.9)."""

    epoch: int = 0  # 0-based
    batch_index: int = 0  # 0-based within the epoch
    iterations_per_epoch: int = 1
    num_epochs: int = 1
    # Under torchrun: this rank's share of the step's global batch (harness/distributed.py); None on
    # one process. A method's loss is a mean over its batch's images; the trainer weights it.
    share: "BatchShare | None" = None


@dataclass
class DomainTarget:
    """One labelling of the batch for DA-WSOL's target sample assigner, with its loss weight.

    Plain methods give one (the labels, weight 1); CutMix gives the two mixed labellings with
    weights lambda and 1 - lambda (spec §5.8).
    """

    labels: Tensor
    weight: float = 1.0


@dataclass
class StepOutput:
    """The result of a method's training step."""

    loss: Tensor  # the method's own loss (classification + its extra terms)
    logits: Tensor  # (B, K), for the training accuracy (measured against the true labels)
    features: Tensor | None = None  # F (B, C, h, w) the CAM weights apply to: what DA-WSOL aligns
    source_features: Tensor | None = None  # z = GAP(F) (B, C), what the classifier sees
    domain_targets: list[DomainTarget] = field(default_factory=list)
    logs: dict[str, float] = field(default_factory=dict)  # extra per-batch figures for the progress log


class ClassifierHead(nn.Module):
    """The classifier on the GAP feature, in the two reference profiles (spec §3.1-3.3).

    DA: a 1x1 conv with bias (xavier weight, zero bias) applied to the GAP vector; on VGG16 it
        starts all-zero, as DA24's VGG DA-WSOL ("contant" init; spec §3.2 decision).
    WE: ResNet/VGG a Linear layer (N(0, 0.01), zero bias); Inception a 1x1 conv (SPG_A4, xavier)
        applied to F before the GAP - the same linear map, so it is computed on the GAP vector too.
    The CAM of class y is the head applied at every position of F; the bias, the 1/C factor of
    WE's ResNet/VGG CAM and DA's float32 pre-normalisation all cancel under the evaluator's
    min-max (spec §3.4), but each profile's exact form is kept so maps match the reference's
    rounding.
    """

    def __init__(self, in_channels: int, num_classes: int, profile: str, family: str):
        super().__init__()
        self.profile = profile
        self.linear_form = profile == "WE" and family in ("resnet", "vgg")
        if self.linear_form:
            self.fc = nn.Linear(in_channels, num_classes)
            nn.init.normal_(self.fc.weight, 0.0, 0.01)
        else:
            self.fc = nn.Conv2d(in_channels, num_classes, kernel_size=1)
            if profile == "DA" and family == "vgg":
                nn.init.zeros_(self.fc.weight)  # spec §3.2 decision: DA24's zero-initialised classifier
            else:
                nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    @property
    def weight(self) -> Tensor:
        return self.fc.weight.reshape(self.fc.weight.shape[0], -1)

    def forward(self, pooled: Tensor) -> Tensor:
        """Logits from the GAP vector (B, C)."""
        return F.linear(pooled, self.weight, self.fc.bias)

    def class_maps(self, features: Tensor, classes: Tensor) -> Tensor:
        """The raw CAM (B, h, w) of one class per image (spec §3.4)."""
        weights = self.weight[classes]  # (B, C)
        cams = torch.einsum("bc,bchw->bhw", weights, features)
        if self.linear_form:  # WE ResNet/VGG: mean over channels of w (.) F, no bias
            return cams / features.shape[1]
        cams = cams + self.fc.bias[classes][:, None, None]
        if self.profile == "DA":
            cams = minmax_per_map(cams.float())  # DA's float32 pre-normalisation (spec §1.5)
        return cams


def minmax_per_map(maps: Tensor) -> Tensor:
    """Min-max each (h, w) map to [0, 1]; a constant map becomes NaN, as 0/0 in the reference."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low)).view_as(maps)


class WSOLMethod(nn.Module):
    """Base class: a backbone plus a classifier head on GAP(F), trained with cross-entropy.

    Subclasses set `name`, `backbone_variant`, an `Options` dataclass, and override what their
    mechanism changes: usually `training_step` (and `class_maps` for methods with their own maps).
    """

    name: ClassVar[str] = ""
    backbone_variant: ClassVar[str] = "cam"
    # Backbones the spec gives this method (spec §3-4); resnet18 is wsolbench's quick CPU stand-in
    # and resnet10_half the embedded default's backbone (neither is in the spec).
    backbones: ClassVar[tuple[str, ...]] = ("resnet50", "vgg16", "inception_v3", "resnet18", "resnet10_half")
    profiles: ClassVar[tuple[str, ...]] = PROFILES

    @dataclass
    class Options:
        pass

    def __init__(self, backbone: Backbone, num_classes: int, profile: str = "DA", options: Any = None):
        super().__init__()
        if profile not in self.profiles:
            raise WsolbenchError(f"method {self.name!r} has no profile {profile!r} (it has {', '.join(self.profiles)})")
        self.backbone = backbone
        self.num_classes = num_classes
        self.profile = profile
        self.options = options if options is not None else self.Options()
        self.head = ClassifierHead(backbone.out_channels, num_classes, profile, backbone.family)

    @property
    def feature_channels(self) -> int:
        """C of the feature map F that DA-WSOL aligns (spec §5.1, §5.8)."""
        return self.backbone.out_channels

    # --- what a method may override ----------------------------------------------------------
    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        """Option values that differ by profile (spec §4.7: WE and DA code defaults differ);
        the Options dataclass holds one profile's, this returns the other's overrides."""
        return {}

    def features(self, images: Tensor) -> Tensor:
        """F (B, C, h, w)."""
        return self.backbone(images)[0]

    def training_step(self, images: Tensor, labels: Tensor, progress: TrainingProgress) -> StepOutput:
        features = self.features(images)
        pooled = features.mean(dim=(2, 3))
        logits = self.head(pooled)
        return StepOutput(loss=F.cross_entropy(logits, labels), logits=logits, features=features,
                          source_features=pooled, domain_targets=[DomainTarget(labels)])

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))

    def predict(self, images: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the raw CAMs of `classes` from one forward pass (eval mode)."""
        features = self.features(images)
        return self.head(features.mean(dim=(2, 3))), self.head.class_maps(features, classes)

    def class_maps(self, images: Tensor, classes: Tensor) -> Tensor:
        return self.predict(images, classes)[1]

    def lr_multiplier(self, name: str) -> float:
        """The LR group of one of this method's parameters (name relative to the method)."""
        if name.startswith("backbone."):
            return self.backbone.lr_multiplier(name[len("backbone."):], self.profile)
        if name.startswith("head."):
            return CLASSIFIER_LR_MULTIPLIER
        raise KeyError(f"{type(self).__name__} has no learning-rate rule for parameter {name!r}")

    def decays(self, name: str) -> bool:
        """Whether the LR schedule decays this parameter (all of a plain method's do)."""
        return True

    def extra_state(self) -> dict[str, Any]:
        """State beyond the weights that an exact resume needs (none for a plain method)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def load_pretrained_classifier(self) -> bool:
        """Profile WE on ILSVRC loads the pretrained 1000-class fc for cam/has/cutmix/adl (spec §3.1)."""
        fc_state = getattr(self.backbone.pretrained_info, "fc_state", None) or {}
        weight = fc_state.get("weight")
        if weight is None or not self.head.linear_form or tuple(weight.shape) != tuple(self.head.fc.weight.shape):
            return False
        self.head.fc.load_state_dict({"weight": weight, "bias": fc_state["bias"]})
        return True


def options_from(cls: type[WSOLMethod], profile: str, values: dict[str, Any]) -> Any:
    """A method's Options: its defaults for the profile, overridden by plain values (names checked)."""
    known = {f.name: f for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise WsolbenchError(f"method {cls.name!r} has no option(s) {', '.join(unknown)}; "
                             f"its options are: {', '.join(known) or '(none)'}")
    return cls.Options(**{**cls.profile_defaults(profile), **values})
