"""DA-WSOL as a wrapper any method can take (spec §5).

    model = DomainAdaptation(method, DomainAdaptationOptions(uda="mmd", lambda1=0.3, lambda2=2))

The wrapper runs the method's own training step, reads the feature map F and source feature z it
returns, splits F's pixels with the target sample assigner (TSA) and adds
    lambda1 * L_d + lambda2 * L_u
to the method's loss (spec §5.7), L_d being MMD (spec §5.5) or DANN's domain loss (spec §5.9) and
L_u the Universum regulariser (spec §5.6). A method whose batch has two labellings (CutMix) gets
the TSA twice and the losses mixed by the same weights (spec §5.8). Test time is the method's,
unchanged (spec §5.11). The method does not know it is wrapped.

Ablations of paper Table 3 (spec §9.5, non-reference): `domain_loss=False` (no L_d, "L_u only"),
`universum_loss=False` (no L_u), `assigner=False` ("no TSA": MMD between sampled pixels and z).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from wsolbench.distributed import SINGLE_PROCESS, BatchShare
from wsolbench.errors import WsolbenchError
from wsolbench.methods.base import CLASSIFIER_LR_MULTIPLIER, StepOutput, TrainingProgress, WSOLMethod
from wsolbench.methods.dawsol.dann import DomainClassifier, domain_adversarial_loss, grl_coefficient
from wsolbench.methods.dawsol.mmd import multi_kernel_mmd
from wsolbench.methods.dawsol.target_sample_assigner import TargetSampleAssigner
from wsolbench.methods.dawsol.universum import universum_loss

UDA_METHODS = ("mmd", "dann")


@dataclass
class DomainAdaptationOptions:
    uda: str = "mmd"  # the domain adaption loss L_d: "mmd" (spec §5.5) or "dann" (spec §5.9)
    lambda1: float = 0.3  # weight of L_d (--beta in the reference)
    lambda2: float = 0.3  # weight of L_u (--univer); the code default, recipes set their own
    start_epoch: int = 0  # DAL is active when the 0-based epoch > start_epoch (spec §5.7)
    source_samples: int = 32  # n_s (spec §5.3)
    target_samples: int = 32  # n_t
    assigner_mode: str = "sequential"  # "sequential" (exact, the reference) or "batched" (faster)
    domain_loss: bool = True  # ablation switches (spec §9.5)
    universum_loss: bool = True
    assigner: bool = True
    clustering_device: str | None = None  # None: F's device; "cpu": the reference's placement
    seed: int = 0  # the TSA's sampling generator


def _share_weight(share: "BatchShare | None", local: int, total: int) -> float:
    """1 on one process; under torchrun this rank's weight for a mean over `local` of the global
    batch's `total` items, divided by the weight the trainer gives the rank's whole loss."""
    if share is None:
        return 1.0
    return share.weight(local, total) / share.loss_weight


class DomainAdaptation(nn.Module):
    """A WSOL method trained with DA-WSOL's domain adaption localization loss."""

    def __init__(self, method: WSOLMethod, options: DomainAdaptationOptions | None = None):
        super().__init__()
        self.method = method
        self.options = options = options or DomainAdaptationOptions()
        if options.uda not in UDA_METHODS:
            raise WsolbenchError(f"unknown domain adaption loss {options.uda!r}; choose from {', '.join(UDA_METHODS)}")
        channels = method.feature_channels
        self.assigner = TargetSampleAssigner(
            method.num_classes, channels, source_samples=options.source_samples,
            target_samples=options.target_samples, mode=options.assigner_mode, use_assigner=options.assigner,
            seed=options.seed, clustering_device=options.clustering_device)
        # DANN's domain classifier trains with its own, never decayed, learning rate (spec §5.9).
        self.domain_classifier = DomainClassifier(channels) if options.uda == "dann" else None
        self.empty_domain_batches = 0  # batches with no image valid for L_d (spec §5.5 decision)
        self.empty_universum_batches = 0

    @property
    def name(self) -> str:
        return f"{self.method.name}+{self.options.uda}"

    def active(self, progress: TrainingProgress) -> bool:
        return progress.epoch > self.options.start_epoch

    def training_step(self, images: Tensor, labels: Tensor, progress: TrainingProgress) -> StepOutput:
        out = self.method.training_step(images, labels, progress)
        # What DA-WSOL does, per batch, for history.json: a user who sees it hurt can see why.
        out.logs["L_c"] = float(out.loss.detach())  # the method's own loss, before L_d and L_u
        if not self.active(progress):  # warm-up: the first epoch(s) train with the method's loss only
            return out
        if out.features is None or out.source_features is None:
            raise WsolbenchError(f"method {self.method.name!r} exposes no feature map for DA-WSOL")
        options = self.options
        share = progress.share
        group = share.group if share is not None else SINGLE_PROCESS
        domain_total = out.loss.new_zeros(())
        universum_total = out.loss.new_zeros(())
        valid = 0
        cluster_pixels = [0.0, 0.0, 0.0]
        for target in out.domain_targets:
            samples = self.assigner.assign(out.features, out.source_features, target.labels, group)
            # Counts and logs are the global batch's (the same on every rank under torchrun).
            valid += samples.batch_valid_count
            if samples.batch_subset_sizes is not None:
                for cluster, size in enumerate(samples.batch_subset_sizes.double().mean(dim=0).tolist()):
                    cluster_pixels[cluster] += size / len(out.domain_targets)
            if samples.batch_valid_count == 0:
                self.empty_domain_batches += 1
            if samples.batch_universum_rows == 0 and options.assigner:
                self.empty_universum_batches += 1
            # L_d is a mean over the batch's valid images and L_u over its Universum rows: a rank's
            # terms, over its own, are weighted by its share of them, relative to the weight the
            # trainer gives the whole loss (harness/distributed.py), so the ranks' mean gradient is
            # the global batch's.
            if options.domain_loss:
                domain_total = domain_total + target.weight * _share_weight(
                    share, samples.valid_count, samples.batch_valid_count) * self._domain_loss(
                    samples.source, samples.target, progress)
            if options.universum_loss:
                universum_total = universum_total + target.weight * _share_weight(
                    share, samples.universum.shape[0], samples.batch_universum_rows) * universum_loss(
                    samples.universum)
        out.loss = out.loss + options.lambda1 * domain_total + options.lambda2 * universum_total
        out.logs.update({
            "L_d": float(domain_total.detach()), "L_u": float(universum_total.detach()),
            # The weighted terms as they enter the loss, beside L_c (spec §5.7).
            "lambda1_L_d": options.lambda1 * float(domain_total.detach()),
            "lambda2_L_u": options.lambda2 * float(universum_total.detach()),
            # Share of (image, labelling) pairs valid for L_d (spec §5.3 step 6).
            "valid_share": valid / ((share.global_images if share is not None else images.shape[0])
                                    * len(out.domain_targets)),
            # Mean pixels per image in the TSA's three clusters (spec §5.3 step 5), and |M0|.
            "universum_pixels": cluster_pixels[0], "fake_target_pixels": cluster_pixels[1],
            "real_target_pixels": cluster_pixels[2],
            "background_anchor_norm": float(self.assigner.universum_anchor.norm()),
        })
        return out

    def _domain_loss(self, source: Tensor, target: Tensor, progress: TrainingProgress) -> Tensor:
        if self.domain_classifier is None:
            return multi_kernel_mmd(source, target)
        coefficient = grl_coefficient(progress.epoch, progress.batch_index, progress.iterations_per_epoch,
                                      progress.num_epochs)
        return domain_adversarial_loss(self.domain_classifier, source, target, coefficient)

    # --- test time and training plumbing: the method's, unchanged ------------------------------
    def logits(self, images: Tensor) -> Tensor:
        return self.method.logits(images)

    def predict(self, images: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        return self.method.predict(images, classes)

    def class_maps(self, images: Tensor, classes: Tensor) -> Tensor:
        return self.method.class_maps(images, classes)

    def lr_multiplier(self, name: str) -> float:
        if name.startswith("method."):
            return self.method.lr_multiplier(name[len("method."):])
        if name.startswith("domain_classifier."):
            return CLASSIFIER_LR_MULTIPLIER  # lr = 10 * lr (spec §5.9)
        raise KeyError(f"DomainAdaptation has no learning-rate rule for parameter {name!r}")

    def decays(self, name: str) -> bool:
        """Whether the LR schedule touches this parameter (DANN's classifier: never, spec §5.9)."""
        return not name.startswith("domain_classifier.")

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the weights for an exact resume."""
        return {"assigner": self.assigner.state_dict(), "empty_domain_batches": self.empty_domain_batches,
                "empty_universum_batches": self.empty_universum_batches}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.assigner.load_state_dict(state["assigner"])
        self.empty_domain_batches = int(state["empty_domain_batches"])
        self.empty_universum_batches = int(state["empty_universum_batches"])
