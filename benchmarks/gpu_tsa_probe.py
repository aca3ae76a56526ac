"""Where a DA-WSOL training step spends its time on a GPU: the target sample assigner (TSA) in
its placements, side by side in one process, and a profile of the sequential (reference) TSA.

    python benchmarks/gpu_tsa_probe.py [--device auto] [--batch-size 32] [--image-size 224]

Rows (ResNet50, large feature map, fp32, CAM + MMD with the DA-WSOL loss active): the CAM step,
the CAM + MMD step with the sequential TSA clustering on F's device, with the sequential TSA
clustering on the CPU (the reference's placement), and with the batched TSA; then the TSA alone
on one batch's features (split into K-means and sampling), the K-means iterations per image, and
a torch.profiler table of one sequential TSA call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from wsolbench.config import resolve_config
from wsolbench.experiment import build_model, resolve_device
from wsolbench.methods.base import TrainingProgress
from wsolbench.methods.dawsol import target_sample_assigner as assigner_module
from wsolbench.trainer import Trainer

from train_step import timed_steps  # this folder's Table-4 benchmark: the same timing loop


def median_ms(fn, steps: int, warmup: int, device: torch.device) -> float:
    return statistics.median(timed_steps(fn, steps, warmup, device)) * 1000


def engines_agree(model, progress, args, device: torch.device) -> bool:
    """Issue 12 on the GPU: the speculative engine (K-means' fixed-size loop, its stop flags read
    through pinned memory and CUDA events) and the per-image engine, from the same state and
    generator, give the same samples and the same state after each of 4 batches (labels from 16
    classes: many same-class images, the sequential semantics at work). The CPU tests show it
    there; here the matmuls are cuBLAS's, whose rounding may depend on the working set's size."""
    engines = [assigner_module.TargetSampleAssigner(args.classes, model.assigner.feature_dim, seed=0,
                                                    sequential_engine=engine)
               for engine in ("speculative", "per_image")]
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
        labels = torch.randint(0, 16, (args.batch_size,), generator=generator).to(device)
        with torch.no_grad():
            out = model.method.training_step(images, labels, progress)
        samples = [engine(out.features.detach(), out.source_features.detach(), labels) for engine in engines]
        for field in ("valid_images", "subset_sizes", "source", "target", "universum"):
            a, b = (getattr(s, field) for s in samples)
            if a.shape != b.shape or not torch.equal(a, b):
                print(f"    differ in {field}")
                return False
        for field in ("universum_anchor", "class_anchors", "class_counts"):
            if not torch.equal(getattr(engines[0], field), getattr(engines[1], field)):
                print(f"    differ in {field}")
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    progress = TrainingProgress(epoch=1, batch_index=0, iterations_per_epoch=100, num_epochs=2)
    per_image = args.batch_size

    def make(uda: str, mode: str = "sequential"):
        config = resolve_config(dict(dataset="bench", data_root="-", out="-", method="cam", uda=uda,
                                     backbone=args.backbone, pretrained="none", image_size=args.image_size,
                                     batch_size=args.batch_size, assigner_mode=mode, epochs=2,
                                     device=args.device))
        model = build_model(config, args.classes)
        trainer = Trainer(model, config, device)
        trainer.start_epoch(1)

        def step() -> None:
            model.train()
            trainer.train_step(images, labels, progress)
        return model, step

    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{args.backbone} {args.image_size}px batch {args.batch_size} fp32, median of {args.steps} steps")
    _, cam_step = make("none")
    cam = median_ms(cam_step, args.steps, args.warmup, device) / per_image
    print(f"  cam                               {cam:8.2f} ms/img")
    for label, mode, clustering in (("cam+mmd sequential, cluster on F's device", "sequential", None),
                                    ("cam+mmd sequential, cluster on CPU", "sequential", "cpu"),
                                    ("cam+mmd batched, cluster on F's device", "batched", None)):
        model, step = make("mmd", mode)
        model.assigner.clustering_device = None if clustering is None else torch.device(clustering)
        value = median_ms(step, args.steps, args.warmup, device) / per_image
        print(f"  {label:<42}{value:8.2f} ms/img  {value / cam:6.2f}x cam", flush=True)

    # The TSA alone on one batch's live features.
    model, _ = make("mmd")
    with torch.no_grad():
        out = model.method.training_step(images, labels, progress)
    features, source = out.features.detach(), out.source_features.detach()
    assigner = model.assigner
    print(f"  speculative engine = per-image engine on {device.type}, 4 batches in a row: "
          f"{engines_agree(model, progress, args, device)}", flush=True)
    iterations: list[int] = []
    kmeans_time = [0.0]
    original = assigner_module.kmeans

    def counted(*a, **k):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = original(*a, **k)
        iterations.extend(result.n_iter.tolist())
        kmeans_time[0] += time.perf_counter() - start
        return result
    assigner_module.kmeans = counted
    # The K-means split is measured where kmeans() is called per image or per batch: the per-image
    # engine and the batched mode (the speculative engine's calls are timed as a whole only).
    for mode, engine, clustering in (("sequential", "per_image", None), ("sequential", "per_image", "cpu"),
                                     ("batched", "per_image", None), ("sequential", "speculative", None)):
        assigner.mode, assigner.sequential_engine = mode, engine
        assigner.clustering_device = None if clustering is None else torch.device(clustering)
        iterations.clear()
        kmeans_time[0] = 0.0
        total = median_ms(lambda: assigner(features, source, labels), 3, 1, device)
        name = engine if mode == "sequential" else mode
        split = (f"K-means {kmeans_time[0] * 1000 / 4 / per_image:7.2f} ms/img; iterations per image "
                 f"{sorted(iterations)[len(iterations) // 2]} median, max {max(iterations)}" if iterations else "")
        print(f"  TSA alone, {name:<11} on {clustering or device.type:<4}: {total / per_image:7.2f} ms/img; {split}",
              flush=True)
    assigner_module.kmeans = original

    # One sequential TSA call under the profiler.
    assigner.mode, assigner.sequential_engine, assigner.clustering_device = "sequential", "speculative", None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        assigner(features, source, labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = profile.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    if device.type == "cuda":
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                print(events.table(sort_by=key, row_limit=12))
                break
            except Exception:  # the key's name differs between torch versions
                continue


if __name__ == "__main__":
    main()
