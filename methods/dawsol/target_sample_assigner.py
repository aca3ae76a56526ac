"""The target sample assigner (TSA) of DA-WSOL: spec §5.2 (state) and §5.3 (per-batch algorithm).

For each image the TSA clusters the pixel features into three subsets, starting from the
Universum anchor M0, the image's source feature z and its class anchor, then samples the
source set S = [z; fake rows], the target set T (real targets) and the Universum U. The returned
rows are slices of the live feature map, so the losses train the extractor through them
(spec §5.10); the clustering itself works on a detached float32 copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .kmeans import KMeansResult, kmeans

MODES = ("sequential", "batched")

# Cluster indices of spec §5.3 step 5, fixed by the order of the initial centres (step 3).
UNIVERSUM, FAKE_TARGET, REAL_TARGET = 0, 1, 2
CLUSTERS = (UNIVERSUM, FAKE_TARGET, REAL_TARGET)


@dataclass
class TargetSamples:
    """What the TSA hands to the losses for one batch."""

    source: Tensor  # (V, n_s, C) with gradient: [z_i; n_s − 1 fake-target rows] per valid image
    target: Tensor  # (V, n_t, C) with gradient: n_t real-target rows per valid image
    universum: Tensor  # (N_u, C) with gradient: all Universum rows of the batch, image order
    valid_count: int  # V, the number of images valid for L_d (spec §5.3 step 6)
    valid_images: Tensor  # (V,) int64 on the CPU: batch indices of the valid images
    subset_sizes: Tensor | None  # (B, 3) int64 on the CPU: |T^u|, |T^f|, |T^t|; None without TSA


class TargetSampleAssigner:
    """The TSA with its persistent state: M0, r0, class anchors M_{k+1} and counts r_k (spec §5.2).

    mode="sequential" (default) is the reference: images are processed in batch order and the
    anchor updates of image i are seen by image i+1 (one K-means problem at a time).
    mode="batched" clusters all images of the batch in one K-means call, every image starting
    from the anchors at batch start; the anchor updates are then applied in batch order. A class
    met for the first time in the batch is initialized (step 2) before clustering, by its first
    image in the batch, so every image of that class starts from that image's z.

    use_assigner=False is the "no TSA" ablation (spec §9.5), read as: no clustering and no
    anchors; each image with at least n_t pixels is valid, its target set is n_t pixels drawn
    uniformly without replacement from all its pixels, its source set is z_i repeated n_s
    times (the MMD then compares the pixel distribution with z), and U is empty (L_u = 0,
    since the Universum is a product of the TSA; paper Table 3 has no "L_u without TSA" row).

    Randomness (the shuffles of step 6) comes only from `generator`, a CPU torch.Generator,
    so a run is reproducible and `state_dict` can capture it.
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        *,
        source_samples: int = 32,
        target_samples: int = 32,
        mode: str = "sequential",
        use_assigner: bool = True,
        generator: torch.Generator | None = None,
        seed: int = 0,
        clustering_device: torch.device | str | None = None,
        kmeans_max_iter: int = 300,
        kmeans_tol: float = 1e-4,
        kmeans_sync_every: int | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"TargetSampleAssigner mode must be one of {MODES}, got {mode!r}")
        if source_samples < 1 or target_samples < 1:
            raise ValueError("TargetSampleAssigner needs source_samples and target_samples >= 1")
        if generator is None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
        if generator.device.type != "cpu":
            raise ValueError("TargetSampleAssigner needs a CPU torch.Generator for its shuffles")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.source_samples = source_samples  # n_s: z plus n_s − 1 fake rows
        self.target_samples = target_samples  # n_t
        self.mode = mode
        self.use_assigner = use_assigner
        self.generator = generator
        # None clusters on the features' own device; "cpu" mirrors the reference's CPU copy.
        self.clustering_device = (
            None if clustering_device is None else torch.device(clustering_device)
        )
        self.kmeans_max_iter = kmeans_max_iter
        self.kmeans_tol = kmeans_tol
        self.kmeans_sync_every = kmeans_sync_every
        # Spec §5.2: float64 state on the CPU, as the reference's numpy arrays.
        self.universum_anchor = torch.zeros(feature_dim, dtype=torch.float64)  # M0
        self.universum_count = 0  # r0
        self.class_anchors = torch.zeros(num_classes, feature_dim, dtype=torch.float64)
        self.class_counts = torch.zeros(num_classes, dtype=torch.int64)  # r_k; 0 means unset

    def __call__(self, features: Tensor, source_features: Tensor, labels: Tensor) -> TargetSamples:
        return self.assign(features, source_features, labels)

    def assign(self, features: Tensor, source_features: Tensor, labels: Tensor) -> TargetSamples:
        """Split a batch into source, target and Universum rows (spec §5.3) and update the state.

        features: F (B, C, h, w), live; source_features: z = GAP(F) (B, C), live; labels: (B,).
        """
        if features.dim() != 4:
            raise ValueError(f"TSA expects features F (B, C, h, w), got {tuple(features.shape)}")
        batch_size, num_features = features.shape[:2]
        if num_features != self.feature_dim:
            raise ValueError(
                f"TSA built for C={self.feature_dim}, got features with C={num_features}"
            )
        if source_features.shape != (batch_size, num_features):
            raise ValueError(
                f"TSA expects source_features (B, C) = {(batch_size, num_features)}, "
                f"got {tuple(source_features.shape)}"
            )
        if labels.shape != (batch_size,):
            raise ValueError(
                f"TSA expects labels (B,) = ({batch_size},), got {tuple(labels.shape)}"
            )

        # Pixel rows in row-major (row, col) order (spec §5.1): a view, so gradients reach F.
        pixel_rows = features.flatten(2).transpose(1, 2)  # (B, N, C)
        class_labels = [int(k) for k in labels.detach().cpu().tolist()]
        if any(k < 0 or k >= self.num_classes for k in class_labels):
            raise ValueError(f"TSA labels must lie in [0, {self.num_classes}), got {class_labels}")
        if not self.use_assigner:
            return self._sample_without_assigner(pixel_rows, source_features)

        source_cpu64 = source_features.detach().to(device="cpu", dtype=torch.float64)
        device = self.clustering_device or features.device
        points = pixel_rows.detach().to(device=device, dtype=torch.float32)
        if self.mode == "sequential":
            cluster_labels = self._cluster_sequential(points, source_cpu64, class_labels)
        else:
            cluster_labels = self._cluster_batched(points, source_cpu64, class_labels)
        return self._sample_subsets(pixel_rows, source_features, cluster_labels)

    # -- clustering and anchor updates (spec §5.3 steps 1-4) ----------------------------------

    def _cluster_sequential(
        self, points: Tensor, source_cpu64: Tensor, class_labels: list[int]
    ) -> Tensor:
        cluster_labels = []
        for image, k in enumerate(class_labels):
            self._visit_class(k, source_cpu64[image])
            initial = self._initial_centres(source_cpu64[image], k)
            result = self._kmeans(points[image : image + 1], initial[None])
            self._update_anchors(k, result.centres[0].to(device="cpu", dtype=torch.float64))
            cluster_labels.append(result.labels[0].cpu())
        return torch.stack(cluster_labels)

    def _cluster_batched(
        self, points: Tensor, source_cpu64: Tensor, class_labels: list[int]
    ) -> Tensor:
        initial = []
        for image, k in enumerate(class_labels):
            # First visits are applied before clustering, in batch order, so a class new to
            # this batch starts every one of its images from its first image's z. M0 and the
            # other anchors are still those of the batch start.
            self._visit_class(k, source_cpu64[image])
            initial.append(self._initial_centres(source_cpu64[image], k))
        result = self._kmeans(points, torch.stack(initial))
        centres_cpu64 = result.centres.to(device="cpu", dtype=torch.float64)
        for image, k in enumerate(class_labels):
            self._update_anchors(k, centres_cpu64[image])
        return result.labels.cpu()

    def _visit_class(self, k: int, source_feature: Tensor) -> None:
        """Spec §5.3 step 2: a class's first visit sets its anchor to z exactly (no ε)."""
        if int(self.class_counts[k]) == 0:
            self.class_counts[k] = 1
            self.class_anchors[k] = source_feature

    def _initial_centres(self, source_feature: Tensor, k: int) -> Tensor:
        """Spec §5.3 step 3: [M0, z_i, M_{k+1}] in this order (float64; K-means casts)."""
        return torch.stack([self.universum_anchor, source_feature, self.class_anchors[k]])

    def _kmeans(self, points: Tensor, initial_centres: Tensor) -> KMeansResult:
        return kmeans(
            points,
            initial_centres.to(device=points.device, dtype=torch.float32),
            max_iter=self.kmeans_max_iter,
            tol=self.kmeans_tol,
            sync_every=self.kmeans_sync_every,
        )

    def _update_anchors(self, k: int, centres: Tensor) -> None:
        """Spec §5.3 step 4: cumulative means; the class anchor follows cluster 1's centroid."""
        self.class_counts[k] += 1
        count = int(self.class_counts[k])
        self.class_anchors[k] = (
            self.class_anchors[k] * (count - 1) / count + centres[FAKE_TARGET] / count
        )
        # The zero initialization of M0 is not counted: the first update gives M0 = ĉ0.
        self.universum_count += 1
        count = self.universum_count
        self.universum_anchor = (
            self.universum_anchor * (count - 1) / count + centres[UNIVERSUM] / count
        )

    # -- sampling (spec §5.3 steps 5-7) --------------------------------------------------------

    def _sample_subsets(
        self, pixel_rows: Tensor, source_features: Tensor, cluster_labels: Tensor
    ) -> TargetSamples:
        num_fake = self.source_samples - 1
        subset_sizes = torch.stack(
            [(cluster_labels == cluster).sum(dim=1) for cluster in CLUSTERS], dim=1
        )
        valid_images, fake_picks, real_picks = [], [], []
        for image in range(cluster_labels.shape[0]):
            _, fake_size, real_size = (int(size) for size in subset_sizes[image])
            # Spec §5.3 step 6: valid iff |T^t| >= n_t and |T^f| >= n_s − 1.
            if real_size < self.target_samples or fake_size < num_fake:
                continue
            fake_pixels = (cluster_labels[image] == FAKE_TARGET).nonzero().squeeze(1)
            real_pixels = (cluster_labels[image] == REAL_TARGET).nonzero().squeeze(1)
            # Shuffle, then take the first rows: fake first, then real, as the reference.
            fake_picks.append(fake_pixels[self._permutation(fake_size)[:num_fake]])
            real_picks.append(real_pixels[self._permutation(real_size)[: self.target_samples]])
            valid_images.append(image)

        universum_image, universum_pixel = (cluster_labels == UNIVERSUM).nonzero(as_tuple=True)
        device = pixel_rows.device
        universum = pixel_rows[universum_image.to(device), universum_pixel.to(device)]
        valid_index = torch.tensor(valid_images, dtype=torch.int64)
        source, target = self._gather_pairs(
            pixel_rows, source_features, valid_index, fake_picks, real_picks, num_fake
        )
        return TargetSamples(
            source, target, universum, len(valid_images), valid_index, subset_sizes
        )

    def _sample_without_assigner(
        self, pixel_rows: Tensor, source_features: Tensor
    ) -> TargetSamples:
        """The "no TSA" ablation (spec §9.5), as read in the class docstring."""
        batch_size, num_pixels, num_features = pixel_rows.shape
        valid_images, target_picks = [], []
        if num_pixels >= self.target_samples:
            for image in range(batch_size):
                target_picks.append(self._permutation(num_pixels)[: self.target_samples])
                valid_images.append(image)
        valid_index = torch.tensor(valid_images, dtype=torch.int64)
        device = pixel_rows.device
        picks = _stack_picks(target_picks, self.target_samples).to(device)
        target = pixel_rows[valid_index.to(device)[:, None], picks]
        z = source_features[valid_index.to(device)].to(pixel_rows.dtype)
        source = z[:, None, :].expand(-1, self.source_samples, -1)
        universum = pixel_rows[:, :0].reshape(0, num_features)
        return TargetSamples(source, target, universum, len(valid_images), valid_index, None)

    def _gather_pairs(
        self,
        pixel_rows: Tensor,
        source_features: Tensor,
        valid_index: Tensor,
        fake_picks: list[Tensor],
        real_picks: list[Tensor],
        num_fake: int,
    ) -> tuple[Tensor, Tensor]:
        device = pixel_rows.device
        images = valid_index.to(device)[:, None]
        fake = pixel_rows[images, _stack_picks(fake_picks, num_fake).to(device)]
        target = pixel_rows[images, _stack_picks(real_picks, self.target_samples).to(device)]
        z = source_features[valid_index.to(device)].to(pixel_rows.dtype)
        source = torch.cat([z[:, None, :], fake], dim=1)
        return source, target

    def _permutation(self, size: int) -> Tensor:
        return torch.randperm(size, generator=self.generator)

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole TSA state: anchors, counts and the generator state (CPU copies).

        The reference keeps this state out of its checkpoints (spec §5.2), so a resumed
        reference run restarts the TSA; saving it lets a wsolbench run resume exactly.
        """
        return {
            "universum_anchor": self.universum_anchor.clone(),
            "universum_count": self.universum_count,
            "class_anchors": self.class_anchors.clone(),
            "class_counts": self.class_counts.clone(),
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`, after which the next batches give identical outputs."""
        class_anchors = state["class_anchors"]
        if tuple(class_anchors.shape) != (self.num_classes, self.feature_dim):
            raise ValueError(
                f"TSA state has class anchors of shape {tuple(class_anchors.shape)}, expected "
                f"{(self.num_classes, self.feature_dim)}"
            )
        cpu = torch.device("cpu")
        self.universum_anchor = state["universum_anchor"].to(cpu, torch.float64).clone()
        self.universum_count = int(state["universum_count"])
        self.class_anchors = class_anchors.to(cpu, torch.float64).clone()
        self.class_counts = state["class_counts"].to(cpu, torch.int64).clone()
        self.generator.set_state(state["generator_state"])


def _stack_picks(picks: list[Tensor], per_image: int) -> Tensor:
    """(V, per_image) pixel indices; V = 0 still indexes F, so empty sets stay in the graph."""
    if picks:
        return torch.stack(picks)
    return torch.zeros(0, per_image, dtype=torch.int64)
