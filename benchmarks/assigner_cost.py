"""What one target-sample-assigner call costs in operator launches and host synchronisations: the
CPU-measurable proxy of its GPU cost (issue 12), with a check that it still assigns as the
reference does.

    python benchmarks/assigner_cost.py [--mode sequential|batched] [--engine speculative|per_image] [--sync-every 3] [--batch 32]
                                       [--pixels 784] [--channels 2048] [--classes 200] [--seed 0] [--json]
                                       [--features synthetic|network] [--warmup-batches 1] [--drawn-classes 16]

One call of `TargetSampleAssigner.assign` on a (B, N, C) = (32, 784, 2048) batch (ResNet50's
28x28 feature map at batch 32), after --warmup-batches calls (1) on other features so that class
anchors exist as they do in training, is run under torch.profiler (CPU) and counted. K-means reads its
stop flags every --sync-every iterations, 3 by default (kmeans.DEVICE_SYNC_EVERY): what it does on a GPU, whose cost
this stands for (on the CPU it checks every iteration, a check costing nothing there).

  ops_per_call    aten operator calls made by the assigner's own code: profiler events named
                  aten::* whose parent event is not itself an aten op (an op's inner aten calls
                  are one launch's work, not launches of their own)
  syncs_per_call  calls that would block the host on a GPU: aten::_local_scalar_dense (.item(),
                  int(t), bool(t)), ops whose output shape depends on the data (nonzero, unique,
                  masked_select, ...; any depth), and the code's reads of device tensors to the
                  host: Tensor.tolist / .cpu() / .to("cpu"), counted through a TorchFunctionMode
                  (on this CPU run they move nothing, on a GPU each is a device-to-host copy).
                  Not counted: .numpy(), which only accepts host tensors (the read, if any, was
                  the .cpu() before it), and .to(device) with the clustering device, an upload on
                  a GPU (asynchronous); the assigner names the host as the string "cpu" in its
                  downloads, so the two are told apart. syncs_old_definition counts these too, as
                  the figures of 2026-12-03 morning did.
  async_reads_per_call  K-means' stop-flag reads (kmeans._StopFlagReader): a non_blocking copy into
                  pinned memory behind the queued work, read through numpy once a CUDA event says it
                  has arrived. Not syncs: on a GPU the host waits for one only where the copy is
                  --sync-every iterations old and still not there, i.e. where the GPU, not the
                  host, is behind, and then the GPU still has those iterations queued. On this CPU
                  run they arrive at once, so the loop acts on them as early as a blocking read
                  would (on a GPU they may come an iteration or more later, and the loop runs those
                  iterations, which change no result; their launches are not in ops_per_call).
  same_assignments  the call's outputs (valid images, subset sizes, the source/target/Universum
                  rows) and the state after it (M0, r0, class anchors and counts) equal those of
                  the reference-exact sequential assigner on the same inputs from the same state

Features are synthetic but shaped like a CAM backbone's: per image a foreground region whose
pixels lean towards a class direction, a background, and noise; labels repeat within the batch
(by default 16 classes drawn for 32 images, --drawn-classes), so the sequential semantics (image
i's update seen by image i+1) matter. The last line printed with --json is one JSON object with the three figures
(and the others above).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

from wsolbench.methods.dawsol.kmeans import DEVICE_SYNC_EVERY
from wsolbench.methods.dawsol.target_sample_assigner import SEQUENTIAL_ENGINES, TargetSampleAssigner

DATA_DEPENDENT_SHAPE_OPS = {
    "aten::nonzero", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::unique_dim_consecutive", "aten::masked_select", "aten::bincount",
    "aten::repeat_interleave", "aten::argwhere", "aten::_local_scalar_dense", "aten::equal",
}
HOST_READS = {"tolist", "cpu"}


class HostReads(TorchFunctionMode):
    """Counts the explicit host reads of tensors made through Python (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.not_syncs: Counter[str] = Counter()  # what the old definition counted as well
        self.async_reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.counts[name] += 1
        elif name == "numpy":
            self.not_syncs["numpy"] += 1
        elif name == "copy_" and kwargs.get("non_blocking", args[2] if len(args) > 2 else False):
            # K-means' stop flags, copied behind the queued work into pinned memory (kmeans._StopFlagReader)
            self.async_reads += 1
        elif name == "to":
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, str) and torch.device(target).type == "cpu":
                self.counts["to(cpu)"] += 1  # a download
            elif isinstance(target, torch.device) and target.type == "cpu":
                self.not_syncs["to(clustering device)"] += 1  # an upload on a GPU
        return func(*args, **kwargs)


def make_batch(batch: int, pixels: int, channels: int, classes: int, generator: torch.Generator,
               drawn_classes: int = 16):
    side = int(round(pixels ** 0.5))
    labels = torch.randint(0, min(classes, drawn_classes), (batch,), generator=generator)
    directions = torch.randn(classes, channels, generator=generator)
    features = torch.randn(batch, channels, side, side, generator=generator) * 0.5
    for i in range(batch):
        r0, c0 = torch.randint(0, side // 2, (2,), generator=generator).tolist()
        features[i, :, r0:r0 + side // 2, c0:c0 + side // 2] += directions[labels[i]][:, None, None]
    features = features.relu()
    return features, features.mean(dim=(2, 3)), labels


NETWORK_CHANNELS = 256  # resnet10_half's last feature map


class NetworkBatches:
    """Batches of a randomly initialised resnet10_half's features on rendered synthetic images
    (224 px, 28x28 maps), labels drawn from --drawn-classes classes of --classes."""

    def __init__(self, args, generator: torch.Generator):
        from wsolbench.methods.backbones import build_backbone

        torch.manual_seed(args.seed)
        self.backbone = build_backbone("resnet10_half", large_feature_map=True).eval()
        self.args, self.generator, self.rendered = args, generator, 0

    def __call__(self):
        import numpy as np

        from wsolbench.datasets.synthetic import render_sample

        args = self.args
        labels = torch.randint(0, min(args.classes, args.drawn_classes), (args.batch,), generator=self.generator)
        images = []
        for class_index in labels.tolist():
            sample = render_sample(args.seed, "train", class_index, self.rendered, num_classes=args.classes)
            self.rendered += 1
            pixels = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1).float()[None] / 255.0
            images.append(torch.nn.functional.interpolate(pixels, size=(224, 224), mode="bilinear",
                                                          align_corners=False)[0])
        features, _ = self.backbone((torch.stack(images) - 0.45) / 0.225)
        features = features.relu()
        return features, features.mean(dim=(2, 3)), labels


def assigner_of(mode: str, args, sync_every: int | None = None, engine: str = "speculative") -> TargetSampleAssigner:
    return TargetSampleAssigner(args.classes, args.channels, source_samples=32, target_samples=32, mode=mode,
                                sequential_engine=engine, seed=args.seed, kmeans_sync_every=sync_every)


def same_outputs(a, b) -> bool:
    pairs = [(a.valid_images, b.valid_images), (a.subset_sizes, b.subset_sizes), (a.source, b.source),
             (a.target, b.target), (a.universum, b.universum)]
    return a.valid_count == b.valid_count and all(
        (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))
        for x, y in pairs)


def same_state(a: TargetSampleAssigner, b: TargetSampleAssigner) -> bool:
    return (torch.equal(a.universum_anchor, b.universum_anchor) and a.universum_count == b.universum_count
            and torch.equal(a.class_anchors, b.class_anchors) and torch.equal(a.class_counts, b.class_counts))


def measure(candidate: TargetSampleAssigner, reference: TargetSampleAssigner, batch) -> dict:
    """One candidate call under the profiler, checked against the reference from the same state."""
    reference.load_state_dict(candidate.state_dict())  # the same state (and shuffles) from here
    host = HostReads()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, host:
        out = candidate.assign(*batch)
    expected = reference.assign(*batch)
    events = profile.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    top_level = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    sync_ops = Counter(e.name for e in aten if e.name in DATA_DEPENDENT_SHAPE_OPS)
    syncs = sum(sync_ops.values()) + sum(host.counts.values())
    return {"ops": len(top_level), "all_aten": len(aten), "syncs": syncs,
            "syncs_old_definition": syncs + sum(host.not_syncs.values()), "async_reads": host.async_reads,
            "same": same_outputs(out, expected) and same_state(candidate, reference),
            "by_op": Counter(e.name for e in top_level), "sync_breakdown": {**sync_ops, **host.counts},
            "not_syncs": host.not_syncs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="sequential", choices=("sequential", "batched"))
    parser.add_argument("--engine", default="speculative", choices=SEQUENTIAL_ENGINES,
                        help="how the sequential mode is computed (default speculative; per_image: one K-means "
                             "problem at a time, the reference the check compares with)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pixels", type=int, default=784)
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drawn-classes", type=int, default=16,
                        help="labels are drawn from this many classes (default 16 for 32 images: many repeats, "
                             "the hard case for the sequential semantics; 200 is a CUB batch)")
    parser.add_argument("--sync-every", type=int, default=DEVICE_SYNC_EVERY,
                        help=f"K-means iterations between stop-flag reads (default {DEVICE_SYNC_EVERY}: what the "
                             "assigner uses on a GPU; on the CPU it checks every iteration)")
    parser.add_argument("--features", choices=("synthetic", "network"), default="synthetic",
                        help="synthetic: shaped like a CAM backbone's, 2-3 Lloyd iterations (the default); network: "
                             "a randomly initialised resnet10_half's 28x28 maps (C=256) of rendered synthetic images, "
                             "10-30 iterations, as real features take")
    parser.add_argument("--warmup-batches", type=int, default=1,
                        help="batches assigned before the measured one (default 1; the state's counts r0, r_k grow "
                             "with them, and with them how often a speculative first step survives the check)")
    parser.add_argument("--calls", type=int, default=1,
                        help="consecutive calls measured (default 1); with more, the figures are their means, "
                             "and the *_each lists give every call's (--warmup-batches 0 --calls 50: a run's "
                             "first 50 batches)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    if args.features == "network":
        args.channels = NETWORK_CHANNELS
        batches = NetworkBatches(args, generator)
    else:
        batches = lambda: make_batch(args.batch, args.pixels, args.channels, args.classes, generator,  # noqa: E731
                                     args.drawn_classes)
    # The candidate runs as it would on a GPU (--sync-every); the reference as on the CPU.
    candidate = assigner_of(args.mode, args, args.sync_every, args.engine)
    reference = assigner_of("sequential", args, engine="per_image")
    with torch.no_grad():
        for _ in range(args.warmup_batches):
            candidate.assign(*batches())
        calls = [measure(candidate, reference, batches()) for _ in range(args.calls)]

    def mean(key: str) -> float | int:
        total = sum(call[key] for call in calls)
        return total if len(calls) == 1 else round(total / len(calls), 1)

    same = all(call["same"] for call in calls)
    last = calls[-1]
    if not args.json:
        print(f"assigner mode {args.mode} ({args.engine if args.mode == 'sequential' else 'one call'}), batch {args.batch}, {args.pixels} pixels, C = {args.channels}"
              + (f", {args.calls} calls (figures: their means; the breakdowns: the last call's)" if args.calls > 1 else ""))
        print(f"  aten ops per call: {mean('ops')} (all aten events, nested included: {mean('all_aten')})")
        print(f"  most frequent: " + ", ".join(f"{name} {count}" for name, count in last["by_op"].most_common(8)))
        print(f"  host syncs per call: {mean('syncs')} = " + ", ".join(
            f"{name} {count}" for name, count in last["sync_breakdown"].items()))
        print(f"  not syncs on a GPU (the old definition counted them too, {mean('syncs_old_definition')} in all): "
              + ", ".join(f"{name} {count}" for name, count in last["not_syncs"].most_common()))
        print(f"  asynchronous reads (K-means' stop flags; not syncs): {mean('async_reads')}")
        print(f"  same assignments as the reference: {same}")
    figures = {"ops_per_call": mean("ops"), "syncs_per_call": mean("syncs"), "same_assignments": same,
               "syncs_old_definition": mean("syncs_old_definition"), "async_reads_per_call": mean("async_reads")}
    if args.calls > 1:
        figures.update(calls=args.calls, ops_per_call_each=[call["ops"] for call in calls],
                       syncs_per_call_each=[call["syncs"] for call in calls])
    print(json.dumps({**figures, "mode": args.mode, "engine": args.engine if args.mode == "sequential" else None,
                      "sync_every": args.sync_every, "features": args.features,
                      "warmup_batches": args.warmup_batches, "seed": args.seed,
                      "drawn_classes": args.drawn_classes, "batch": args.batch, "pixels": args.pixels,
                      "channels": args.channels, "sync_breakdown": last["sync_breakdown"]}))


if __name__ == "__main__":
    main()
