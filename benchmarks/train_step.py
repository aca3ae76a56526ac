"""Training- and test-step cost, side by side in one run: a bare WSOL backbone step, each
method's step, and the same method with DA-WSOL (MMD, DANN), on synthetic tensors. With all six
methods this is the shape of paper Table 4 (spec §7, "model-only" timing).

    python benchmarks/train_step.py [--backbone resnet50] [--image-size 224] [--batch-size 32]
                                    [--precision fp32|bf16] [--channels-last] [--device auto]
                                    [--methods cam,has,acol,spg,adl,cutmix] [--steps 20] [--warmup 5]
                                    [--assigner-mode sequential|batched] [--sequential-engine auto|speculative|per_image]

"bare" is the floor: the WSOL backbone (layer4 at stride 1), GAP, a linear head, cross-entropy,
SGD - nothing of wsolbench's method or trainer code. Each other row runs exactly what
`wsolbench train` runs per batch (the method's training_step through the DA-WSOL wrapper, the
same optimiser and parameter groups), with the DA-WSOL loss active. The test column runs what
scoring a split runs per batch: the forward pass with the CAM of the GT class, the protocol's map
post-processing and the evaluator's per-map work (one GT box per image, interval 0.001).
Reported: median ms per image over the timed steps (CUDA synchronised around each step), and
ratios to the bare step and to the method without DA-WSOL, all measured in this one process.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from wsolbench.config import resolve_config
from wsolbench.evaluator import best_ious_fast, score_thresholds
from wsolbench.experiment import build_model, resolve_device
from wsolbench.scoremaps import postprocess_cam
from wsolbench.methods.backbones import build_backbone
from wsolbench.methods.base import TrainingProgress
from wsolbench.methods.dawsol.target_sample_assigner import ENGINE_CHOICES
from wsolbench.trainer import Trainer


def timed_steps(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--large-feature-map", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default="cam")
    parser.add_argument("--uda", default="none,mmd,dann")
    parser.add_argument("--assigner-mode", default="sequential", choices=("sequential", "batched"))
    parser.add_argument("--sequential-engine", default="auto", choices=ENGINE_CHOICES,
                        help="how the sequential assigner is computed (the same results; per_image: one K-means "
                             "problem at a time, as before issue 12)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    if args.channels_last:
        images = images.to(memory_format=torch.channels_last)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    # The floor: backbone + GAP + linear + CE + SGD.
    backbone = build_backbone(args.backbone, large_feature_map=args.large_feature_map).to(device)
    head = torch.nn.Linear(backbone.out_channels, args.classes).to(device)
    if args.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=1e-3, momentum=0.9,
                                nesterov=True, weight_decay=1e-4)

    def bare_step() -> None:
        with autocast:
            features, _ = backbone(images)
            loss = F.cross_entropy(head(features.mean(dim=(2, 3))), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rows = [("bare", timed_steps(bare_step, args.steps, args.warmup, device), None)]
    thresholds = score_thresholds(0.001)
    size = (args.image_size, args.image_size)
    gt_box = np.array([[args.image_size // 4, args.image_size // 4, args.image_size // 2, args.image_size * 3 // 4]])

    for method in args.methods.split(","):
        for uda in args.uda.split(","):
            config = resolve_config(dict(dataset="bench", data_root="-", out="-", method=method, uda=uda,
                                         backbone=args.backbone, pretrained="none", image_size=args.image_size,
                                         batch_size=args.batch_size, precision=args.precision,
                                         channels_last=args.channels_last, large_feature_map=args.large_feature_map,
                                         assigner_mode=args.assigner_mode, epochs=2, device=args.device))
            model = build_model(config, args.classes)
            if uda != "none":
                model.assigner.sequential_engine = args.sequential_engine
            trainer = Trainer(model, config, device)
            trainer.start_epoch(1)
            progress = TrainingProgress(epoch=1, batch_index=0, iterations_per_epoch=100, num_epochs=2)  # DAL on

            def step() -> None:
                model.train()
                trainer.train_step(images, labels, progress)

            def test_step() -> None:
                model.eval()
                with torch.no_grad(), trainer.autocast:
                    _, cams = model.predict(images, labels)
                for cam in cams.float().cpu().numpy():
                    best_ious_fast(postprocess_cam(cam, size), gt_box, thresholds, largest=True)

            name = method if uda == "none" else f"{method}+{uda}"
            rows.append((name, timed_steps(step, args.steps, args.warmup, device),
                         timed_steps(test_step, max(3, args.steps // 4), 1, device)))

    per_image = {name: statistics.median(times) * 1000 / args.batch_size for name, times, _ in rows}
    test_per_image = {name: statistics.median(times) * 1000 / args.batch_size for name, _, times in rows if times}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.backbone} {args.image_size}px batch {args.batch_size} {args.precision}"
          f"{' channels_last' if args.channels_last else ''}, {device_name}, median of {args.steps} train steps")
    print(f"  {'':<14}{'train ms/img':>13}{'/bare':>7}{'/base':>7}{'test ms/img':>13}{'/base':>7}")
    for name, value in per_image.items():
        base = name.split("+")[0]
        train_ratio = f"{value / per_image[base]:7.2f}" if "+" in name else f"{'':7}"
        test = test_per_image.get(name)
        test_cells = (f"{test:13.2f}" + (f"{test / test_per_image[base]:7.2f}" if "+" in name else "")) if test else ""
        print(f"  {name:<14}{value:13.2f}{value / per_image['bare']:7.2f}{train_ratio}{test_cells}")


if __name__ == "__main__":
    main()
