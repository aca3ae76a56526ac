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

import numpy as np
import torch
from torch import Tensor

from wsolbench.distributed import SINGLE_PROCESS, ProcessGroup

from .kmeans import FirstStep, KMeansResult, PreparedPoints, first_step, kmeans, kmeans_prepared, prepare_points

MODES = ("sequential", "batched")
# How the sequential mode is computed; both give the reference's results exactly (tests compare).
# "auto" picks by the clustering device: speculative off the CPU, where launches and host syncs
# are the cost; per_image on the CPU, where they cost nothing and the speculative engine's checks
# and reruns are extra work (1.4-2.2x slower there on network features, benchmarks/RESULTS.md).
SEQUENTIAL_ENGINES = ("speculative", "per_image")
ENGINE_CHOICES = ("auto", *SEQUENTIAL_ENGINES)

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
    # Under torchrun, the same over the step's global batch, of which this rank's images are a
    # share (the losses' means run over the global batch: DomainAdaptation weights by them); on
    # one process they equal valid_count, the rows of universum and subset_sizes.
    batch_valid_count: int = -1
    batch_universum_rows: int = -1
    batch_subset_sizes: Tensor | None = None

    def __post_init__(self) -> None:
        if self.batch_valid_count < 0:
            self.batch_valid_count = self.valid_count
        if self.batch_universum_rows < 0:
            self.batch_universum_rows = int(self.universum.shape[0])
        if self.batch_subset_sizes is None:
            self.batch_subset_sizes = self.subset_sizes


class TargetSampleAssigner:
    """The TSA with its persistent state: M0, r0, class anchors M_{k+1} and counts r_k (spec §5.2).

    mode="sequential" (default) is the reference: images are processed in batch order and the
    anchor updates of image i are seen by image i+1. Two engines compute it, with the same
    results (tests compare them on random and on real-feature batches); "auto" (default) takes the
    speculative engine off the CPU and the per-image one on it:
      "speculative": K-means for many images at once, then a check, in batch order,
        that each image's run is the one the sequential order makes (see
        `_cluster_speculative`); images that fail the check are run again. Few kernel launches
        and host synchronisations per batch, which is what a GPU needs (issue 12).
      "per_image": one K-means problem at a time, the definition written out.
    mode="batched" (not the reference) clusters all images of the batch in one K-means call,
    every image starting from the anchors at batch start; the anchor updates are then applied in
    batch order. A class met for the first time in the batch is initialized (step 2) before
    clustering, by its first image in the batch, so every image of that class starts from that
    image's z.

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
        sequential_engine: str = "auto",
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
        if sequential_engine not in ENGINE_CHOICES:
            raise ValueError(f"TargetSampleAssigner sequential_engine must be one of {ENGINE_CHOICES}, "
                             f"got {sequential_engine!r}")
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
        self.sequential_engine = sequential_engine
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

    def __call__(self, features: Tensor, source_features: Tensor, labels: Tensor,
                 group: ProcessGroup = SINGLE_PROCESS) -> TargetSamples:
        return self.assign(features, source_features, labels, group)

    def assign(self, features: Tensor, source_features: Tensor, labels: Tensor,
               group: ProcessGroup = SINGLE_PROCESS) -> TargetSamples:
        """Split a batch into source, target and Universum rows (spec §5.3) and update the state.

        features: F (B, C, h, w), live; source_features: z = GAP(F) (B, C), live; labels: (B,).

        Under torchrun (`group` of several ranks, each holding a contiguous share of the global
        batch in rank order) the state is the whole run's, identical on every rank. wsolbench
        decision, beside spec §5.2: every rank gathers the detached features, z and labels of the
        whole global batch and runs the sequential assignment over it in global batch order, from
        the same state with the same generator, so every rank makes the same anchor updates and
        shuffles, and the single process's on the same global batch: image i's updates are seen
        by image i+1 whichever rank holds it. Each rank then takes its own images' samples from
        its live features. The cost: the detached features of the global batch are all-gathered
        each step (float32; 205 MB for ResNet50's 32 x 28 x 28 x 2048) and every rank clusters the
        whole batch. The cheaper alternative, each rank clustering its share from the step-start
        state and the updates merged after, would not be the sequential semantics: a rank's first
        image would not see the updates of the images before it on lower ranks.
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
        # The whole batch's (on one process: this one's): gathered where several ranks share it.
        batch_labels, offset = group.gather_batch(labels.detach())
        class_labels = [int(k) for k in batch_labels.cpu().tolist()]
        if any(k < 0 or k >= self.num_classes for k in class_labels):
            raise ValueError(f"TSA labels must lie in [0, {self.num_classes}), got {class_labels}")
        if not self.use_assigner:
            return self._sample_without_assigner(pixel_rows, source_features, len(class_labels), offset)

        batch_source, _ = group.gather_batch(source_features.detach().float())
        source64 = batch_source.to(device="cpu", dtype=torch.float64).numpy()
        device = self.clustering_device or features.device
        batch_rows, _ = group.gather_batch(pixel_rows.detach().float())
        # Contiguous (B, N, C) whether gathered or not: K-means' float32 sums depend on the layout,
        # and the gathered batch is contiguous.
        points = batch_rows.to(device=device, dtype=torch.float32).contiguous()
        anchors = _Anchors.of(self)
        if self.mode == "batched":
            cluster_labels = self._cluster_batched(points, source64, class_labels, anchors)
        elif self.sequential_engine == "per_image" or (self.sequential_engine == "auto" and device.type == "cpu"):
            cluster_labels = self._cluster_per_image(points, source64, class_labels, anchors)
        else:
            cluster_labels = self._cluster_speculative(points, source64, class_labels, anchors)
        anchors.store(self)  # only now: a batch that fails part-way leaves the state as it was
        return self._sample_subsets(pixel_rows, source_features, cluster_labels, offset)

    # -- clustering and anchor updates (spec §5.3 steps 1-4) ----------------------------------

    def _cluster_per_image(self, points: Tensor, source64: np.ndarray, class_labels: list[int],
                           anchors: "_Anchors") -> Tensor:
        cluster_labels = []
        for image, k in enumerate(class_labels):
            anchors.visit(k, source64[image])
            initial = anchors.initial_centres(k, source64[image])
            result = self._kmeans(points[image : image + 1], torch.from_numpy(initial)[None])
            anchors.update(k, result.centres[0].to(device="cpu", dtype=torch.float64).numpy())
            cluster_labels.append(result.labels[0])
        return torch.stack(cluster_labels)

    def _cluster_speculative(self, points: Tensor, source64: np.ndarray, class_labels: list[int],
                             anchors: "_Anchors") -> Tensor:
        """The sequential semantics from a few batched K-means calls (issue 12).

        Image i's K-means starts from [M0, z_i, M_{k+1}] as they stand after images 0..i-1. Its
        run depends on those initial centres only through its first Lloyd iteration
        (kmeans.FirstStep: the first labels, the first centres after relocation, the first stop
        test). So:
          1. Every image of the batch is run at once, from the state at the batch's start: M0 and
             the class anchors as they stand (a class first visited in this batch: its first
             image's z, as the batched mode starts it). A guess, for every image after the
             first: its predecessors move M0, and those of its class its class anchor.
          2. Then, in batch order, the true initial centres of every image are replayed from
             the batch-start state with every image's final centres (`_replay`: the same
             arithmetic as the per-image engine), and every image's first iteration from its
             true centres is compared, exactly, with the one its run made. Up to the first
             mismatch all runs are the sequential ones; from the first mismatch on, the images
             that failed are run again from their replayed centres (the first of them is then
             exact) and the check repeats after it. The K-means problems of one call are
             independent (kmeans_prepared), so a run's result does not depend on its company.
        Step 1 once ran in class generations (the (g+1)-th image of each class in the g-th call,
        its class anchor then exact). On a real network's features that made 10-60% more
        launches: the calls wait on each other, and later images fail the check all the same,
        through M0. On the synthetic features of benchmarks/assigner_cost.py's default it made
        15-25% fewer (benchmarks/RESULTS.md, issue 12).
        """
        batch_size, num_points, num_features = points.shape
        device = points.device
        prepared = prepare_points(points, self.kmeans_tol)
        cluster_labels = torch.empty(batch_size, num_points, dtype=torch.int64, device=device)
        recorded = FirstStep(
            torch.empty(batch_size, num_points, dtype=torch.int64, device=device),
            torch.empty(batch_size, len(CLUSTERS), num_features, dtype=torch.float32, device=device),
            torch.empty(batch_size, dtype=torch.bool, device=device),
        )
        finals = np.zeros((batch_size, len(CLUSTERS), num_features))
        known = np.zeros(batch_size, dtype=bool)

        def run(images: list[int], initial: np.ndarray) -> None:
            index = torch.tensor(images, device=device)
            result, first = kmeans_prepared(
                prepared if len(images) == batch_size else prepared.select(index), torch.from_numpy(initial),
                max_iter=self.kmeans_max_iter, sync_every=self.kmeans_sync_every, record_first_step=True)
            cluster_labels[index] = result.labels
            for buffer, value in zip(recorded, first):
                buffer[index] = value
            finals[images] = result.centres.to(device="cpu", dtype=torch.float64).numpy()
            known[images] = True

        run(list(range(batch_size)), _replay(anchors, class_labels, source64, finals, known)[0])

        checked_before = 0  # images before it are known to be the sequential runs
        while True:
            initial, final_state = _replay(anchors, class_labels, source64, finals, known)
            pending = list(range(checked_before, batch_size))
            if not pending:
                break
            agree = _same_first_steps(prepared, recorded, pending, initial[pending])
            if all(agree):
                break
            redo = [image for image, same in zip(pending, agree) if not same]
            run(redo, initial[redo])
            checked_before = redo[0] + 1  # redo[0] started from its true centres
        anchors.replace_with(final_state)
        return cluster_labels

    def _cluster_batched(self, points: Tensor, source64: np.ndarray, class_labels: list[int],
                         anchors: "_Anchors") -> Tensor:
        initial = []
        for image, k in enumerate(class_labels):
            # First visits are applied before clustering, in batch order, so a class new to
            # this batch starts every one of its images from its first image's z. M0 and the
            # other anchors are still those of the batch start.
            anchors.visit(k, source64[image])
            initial.append(anchors.initial_centres(k, source64[image]))
        result = self._kmeans(points, torch.from_numpy(np.stack(initial)))
        centres = result.centres.to(device="cpu", dtype=torch.float64).numpy()
        for image, k in enumerate(class_labels):
            anchors.update(k, centres[image])
        return result.labels

    def _kmeans(self, points: Tensor, initial_centres: Tensor) -> KMeansResult:
        return kmeans(
            points,
            initial_centres.to(device=points.device, dtype=torch.float32),
            max_iter=self.kmeans_max_iter,
            tol=self.kmeans_tol,
            sync_every=self.kmeans_sync_every,
        )

    # -- sampling (spec §5.3 steps 5-7) --------------------------------------------------------

    def _sample_subsets(
        self, pixel_rows: Tensor, source_features: Tensor, cluster_labels: Tensor, offset: int = 0
    ) -> TargetSamples:
        """Steps 5-7 for the batch's images in order, drawing every image's shuffles (so the
        generator moves as on one process); the samples are those of this rank's images
        offset .. offset + len(pixel_rows) - 1 (all of them on one process)."""
        num_fake = self.source_samples - 1
        local = range(offset, offset + pixel_rows.shape[0])
        # One read of the labels to the host; the per-image index work is host work from here.
        labels_host = cluster_labels.cpu().numpy()
        batch_sizes = np.stack([(labels_host == cluster).sum(axis=1) for cluster in CLUSTERS], axis=1)
        batch_valid = 0
        valid_images, fake_picks, real_picks = [], [], []
        for image, (_, fake_size, real_size) in enumerate(batch_sizes.tolist()):
            # Spec §5.3 step 6: valid iff |T^t| >= n_t and |T^f| >= n_s − 1.
            if real_size < self.target_samples or fake_size < num_fake:
                continue
            fake_pixels = np.flatnonzero(labels_host[image] == FAKE_TARGET)
            real_pixels = np.flatnonzero(labels_host[image] == REAL_TARGET)
            # Shuffle, then take the first rows: fake first, then real, as the reference.
            fake_pick = fake_pixels[self._permutation(fake_size)[:num_fake]]
            real_pick = real_pixels[self._permutation(real_size)[: self.target_samples]]
            batch_valid += 1
            if image in local:
                fake_picks.append(fake_pick)
                real_picks.append(real_pick)
                valid_images.append(image - offset)

        batch_universum = int(batch_sizes[:, UNIVERSUM].sum())
        labels_host = labels_host[local.start : local.stop]
        sizes = batch_sizes[local.start : local.stop]
        universum_image, universum_pixel = np.nonzero(labels_host == UNIVERSUM)  # row-major order
        device = pixel_rows.device
        universum = pixel_rows[torch.from_numpy(universum_image).to(device),
                               torch.from_numpy(universum_pixel).to(device)]
        valid_index = torch.tensor(valid_images, dtype=torch.int64)
        source, target = self._gather_pairs(
            pixel_rows, source_features, valid_index, fake_picks, real_picks, num_fake
        )
        return TargetSamples(
            source, target, universum, len(valid_images), valid_index, torch.from_numpy(sizes.astype(np.int64)),
            batch_valid, batch_universum, torch.from_numpy(batch_sizes.astype(np.int64)),
        )

    def _sample_without_assigner(
        self, pixel_rows: Tensor, source_features: Tensor, batch_size: int, offset: int
    ) -> TargetSamples:
        """The "no TSA" ablation (spec §9.5), as read in the class docstring; every image of the
        `batch_size`-image batch draws its shuffle, this rank's images start at `offset`."""
        num_pixels, num_features = pixel_rows.shape[1:]
        valid_images, target_picks = [], []
        if num_pixels >= self.target_samples:
            for image in range(batch_size):
                pick = self._permutation(num_pixels)[: self.target_samples]
                if offset <= image < offset + pixel_rows.shape[0]:
                    target_picks.append(pick)
                    valid_images.append(image - offset)
        valid_index = torch.tensor(valid_images, dtype=torch.int64)
        device = pixel_rows.device
        picks = _stack_picks(target_picks, self.target_samples).to(device)
        target = pixel_rows[valid_index.to(device)[:, None], picks]
        z = source_features[valid_index.to(device)].to(pixel_rows.dtype)
        source = z[:, None, :].expand(-1, self.source_samples, -1)
        universum = pixel_rows[:, :0].reshape(0, num_features)
        return TargetSamples(source, target, universum, len(valid_images), valid_index, None,
                             batch_size if num_pixels >= self.target_samples else 0, 0)

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

    def _permutation(self, size: int) -> np.ndarray:
        """A shuffle of range(size) from the generator, drawn straight into a numpy array (the
        host's index work is numpy's; Tensor.numpy() would cost four more operator calls)."""
        shuffle = np.empty(size, dtype=np.int64)
        torch.randperm(size, generator=self.generator, out=torch.from_numpy(shuffle))
        return shuffle

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


class _Anchors:
    """The state of spec §5.2 as float64 numpy arrays, with the per-image steps 2-4 of §5.3.

    The one implementation of the state's arithmetic, for every engine. The assigner keeps it
    as torch tensors (its attributes, its checkpoints); `of` copies them in at a batch's start,
    `store` writes the result back at its end.
    """

    def __init__(self, universum: np.ndarray, universum_count: int, classes: np.ndarray, counts: np.ndarray):
        self.universum = universum  # M0 (C,)
        self.universum_count = universum_count  # r0
        self.classes = classes  # M_{k+1} (K, C)
        self.counts = counts  # r_k (K,); 0 means unset

    @classmethod
    def of(cls, assigner: TargetSampleAssigner) -> "_Anchors":
        return cls(assigner.universum_anchor.numpy().copy(), int(assigner.universum_count),
                   assigner.class_anchors.numpy().copy(), assigner.class_counts.numpy().copy())

    def copy(self) -> "_Anchors":
        return _Anchors(self.universum.copy(), self.universum_count, self.classes.copy(), self.counts.copy())

    def replace_with(self, other: "_Anchors") -> None:
        self.universum, self.universum_count = other.universum, other.universum_count
        self.classes, self.counts = other.classes, other.counts

    def store(self, assigner: TargetSampleAssigner) -> None:
        assigner.universum_anchor = torch.from_numpy(self.universum)
        assigner.universum_count = self.universum_count
        assigner.class_anchors = torch.from_numpy(self.classes)
        assigner.class_counts = torch.from_numpy(self.counts)

    def visit(self, k: int, source_feature: np.ndarray) -> None:
        """Spec §5.3 step 2: a class's first visit sets its anchor to z exactly (no ε)."""
        if self.counts[k] == 0:
            self.counts[k] = 1
            self.classes[k] = source_feature

    def initial_centres(self, k: int, source_feature: np.ndarray) -> np.ndarray:
        """Spec §5.3 step 3: [M0, z_i, M_{k+1}] in this order (float64; K-means casts)."""
        return np.stack([self.universum, source_feature, self.classes[k]])

    def update(self, k: int, centres: np.ndarray) -> None:
        """Spec §5.3 step 4: cumulative means; the class anchor follows cluster 1's centroid."""
        self.counts[k] += 1
        count = int(self.counts[k])
        self.classes[k] = self.classes[k] * (count - 1) / count + centres[FAKE_TARGET] / count
        # The zero initialization of M0 is not counted: the first update gives M0 = ĉ0.
        self.universum_count += 1
        count = self.universum_count
        self.universum = self.universum * (count - 1) / count + centres[UNIVERSUM] / count


def _replay(start: _Anchors, class_labels: list[int], source64: np.ndarray, finals: np.ndarray,
            known: np.ndarray) -> tuple[np.ndarray, _Anchors]:
    """Steps 2-4 in batch order from `start`, with image i's final centres finals[i] where
    known[i] (an image not run yet adds no update): each image's initial centres, and the state
    after the batch. With every image known this is the sequential state, exactly."""
    state = start.copy()
    initial = np.empty((len(class_labels), len(CLUSTERS), source64.shape[1]))
    for image, k in enumerate(class_labels):
        state.visit(k, source64[image])
        initial[image] = state.initial_centres(k, source64[image])
        if known[image]:
            state.update(k, finals[image])
    return initial, state


def _same_first_steps(prepared: PreparedPoints, recorded: FirstStep, images: list[int],
                      initial: np.ndarray) -> list[bool]:
    """Per image: does its first Lloyd iteration from `initial` equal the recorded one, exactly?"""
    index = torch.tensor(images, device=recorded.labels.device)
    truth = first_step(prepared.select(index), torch.from_numpy(initial))
    same = ((truth.labels == recorded.labels[index]).all(dim=1)
            & (truth.centres == recorded.centres[index]).flatten(1).all(dim=1)
            & (truth.stopped == recorded.stopped[index]))
    return same.tolist()  # the check's one host read


def _stack_picks(picks: list[np.ndarray], per_image: int) -> Tensor:
    """(V, per_image) pixel indices; V = 0 still indexes F, so empty sets stay in the graph."""
    if picks:
        return torch.from_numpy(np.stack(picks).astype(np.int64, copy=False))
    return torch.zeros(0, per_image, dtype=torch.int64)
