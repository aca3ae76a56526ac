"""The `wsolbench` command: one entry point, one subcommand per job.

    wsolbench evaluate   score maps + metadata -> the protocol's metrics (stable interface)
    wsolbench prepare    generate the synthetic dataset, or write ILSVRC train metadata

Errors a user can fix are printed as one line (`wsolbench: error: <file>:<line>: ...`) with exit
status 2; nothing is written on error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from wsolbench import __version__
from wsolbench.errors import WsolbenchError


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score maps -> MaxBoxAcc / MaxBoxAccV2 / PxAP / pIoU (the protocol's evaluator)",
        description="Evaluate score maps <scoremap-root>/<image_id>.npy (float, in [0, 1], at the evaluation "
                    "size) against the boxes or masks of <metadata-root>/<dataset>/<split>/. Whether the split "
                    "has boxes or masks is read from its localization.txt.")
    p.add_argument("--scoremap-root", required=True, type=Path, help="folder of <image_id>.npy score maps")
    p.add_argument("--metadata-root", type=Path, default=None,
                   help="folder holding <dataset>/<split>/ metadata (default: the real CUB/ILSVRC/OpenImages "
                        "metadata shipped with wsolbench)")
    p.add_argument("--dataset", required=True, help="dataset folder name under the metadata root (any name)")
    p.add_argument("--split", required=True, help="split folder name, e.g. val or test")
    p.add_argument("--cam-curve-interval", type=float, default=0.001,
                   help="threshold step: thresholds are numpy.arange(0, 1, interval) (default 0.001, the protocol's)")
    box = p.add_mutually_exclusive_group()
    box.add_argument("--box-v1", dest="box_metric", action="store_const", const="v1",
                     help="MaxBoxAcc (CVPR'20): the largest contour, IoU 50")
    box.add_argument("--box-v2", dest="box_metric", action="store_const", const="v2",
                     help="MaxBoxAccV2 (default): all contours, mean over IoU 30/50/70")
    p.set_defaults(box_metric="v2")
    p.add_argument("--mask-root", type=Path, help="folder the mask paths of a mask split are relative to")
    p.add_argument("--predictions", type=Path,
                   help="CSV of image_id,class predictions: adds Top-1 Cls and Top-1 Loc")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--curves", type=Path,
                   help="write the per-threshold curves (box accuracy, or precision/recall/IoU) to this JSON file")
    p.add_argument("--postprocess", action="store_true",
                   help="accept raw maps of any size and range: OpenCV bicubic resize to the evaluation size and "
                        "min-max normalisation, as the protocol's map post-processing does (spec §1.5)")
    p.add_argument("--image-size", type=int, default=224, help="evaluation size of the maps (default 224)")
    p.add_argument("--workers", type=int, default=None, help="threads (default: the number of CPUs, at most 8)")
    p.add_argument("--engine", choices=("fast", "definition"), default="fast",
                   help="'definition' runs OpenCV at every threshold as the spec words it (slow; for audits)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from wsolbench import atomic
    from wsolbench.datasets.metadata import read_split
    from wsolbench.evaluator import evaluate_split, read_predictions
    from wsolbench.scoremaps import check_scoremaps_exist, load_scoremap

    if not args.scoremap_root.is_dir():
        raise WsolbenchError(f"{args.scoremap_root}: score-map folder does not exist")
    metadata = read_split(args.metadata_root, args.dataset, args.split)
    check_scoremaps_exist(args.scoremap_root, metadata.image_ids)
    predictions = read_predictions(args.predictions, metadata) if args.predictions else None
    size = (args.image_size, args.image_size)
    result = evaluate_split(
        metadata, lambda image_id: load_scoremap(args.scoremap_root, image_id, size, args.postprocess),
        cam_curve_interval=args.cam_curve_interval, box_metric=args.box_metric, mask_root=args.mask_root,
        predictions=predictions, image_size=size, engine=args.engine, workers=args.workers,
        progress=not args.quiet and len(metadata) >= 200)
    summary = result.to_dict()
    if args.curves:
        atomic.write_json(args.curves, result.curves())
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """A readable table of an evaluation summary."""
    rows = [("dataset / split", f"{summary['dataset']} / {summary['split']}"),
            ("images", str(summary["num_images"])),
            ("cam_curve_interval", f"{summary['cam_curve_interval']:g}")]
    metric = summary["metric"]
    if metric == "PxAP":
        rows += [("PxAP", f"{summary['PxAP']:.4f}"),
                 ("pIoU", f"{summary['pIoU']:.4f}  (threshold {summary['pIoU threshold']:g})")]
    else:
        rows.append((metric, f"{summary[metric]:.4f}"))
        for iou, value in summary["per_iou"].items():
            rows.append((f"  IoU {iou}", f"{value:.4f}  (threshold {summary['best_threshold'][iou]:g})"))
        rows.append(("GT-known Loc", f"{summary['GT-known Loc']:.4f}  (threshold {summary['GT-known Loc threshold']:g})"))
        if "Top-1 Loc" in summary:
            rows.append(("Top-1 Loc", f"{summary['Top-1 Loc']:.4f}  (threshold {summary['Top-1 Loc threshold']:g})"))
    if "Top-1 Cls" in summary:
        rows.append(("Top-1 Cls", f"{summary['Top-1 Cls']:.4f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _add_prepare(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="generate the synthetic dataset, or write ILSVRC train metadata")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{synthetic,ilsvrc-train}")
    s = kinds.add_parser("synthetic", help="generate the embedded default dataset (deterministic from a seed)",
                         description="Write images, masks and metadata (datasets SyntheticBoxes and "
                                     "SyntheticMasks) of a small synthetic WSOL dataset into --out.")
    s.add_argument("--out", type=Path, required=True, help="output folder (replaced only if --force)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(run=_run_prepare_synthetic)
    i = kinds.add_parser("ilsvrc-train", help="write ILSVRC/train metadata from an ImageNet train folder",
                         description="Scan <imagenet-root>/train/<wnid>/*.JPEG and write "
                                     "<out>/ILSVRC/train/{image_ids,class_labels,image_sizes,localization}.txt "
                                     "(classes in sorted wnid order, ids relative to --imagenet-root).")
    i.add_argument("--imagenet-root", type=Path, required=True, help="folder that holds train/<wnid>/")
    i.add_argument("--out", type=Path, required=True, help="metadata root to write ILSVRC/train/ into")
    i.add_argument("--force", action="store_true", help="replace an existing ILSVRC/train folder")
    i.set_defaults(run=_run_prepare_ilsvrc)


def _run_prepare_synthetic(args: argparse.Namespace) -> int:
    from wsolbench.datasets import synthetic

    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise WsolbenchError(f"{args.out}: exists and is not empty (pass --force to replace it)")
    bar = None
    callback = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(desc="generate synthetic", unit="img", file=sys.stderr, dynamic_ncols=True)

        def callback(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
    try:
        summary = synthetic.generate(args.out, seed=args.seed, progress=callback)
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {args.out} ({summary})")
    return 0


def _run_prepare_ilsvrc(args: argparse.Namespace) -> int:
    from wsolbench.datasets.imagenet import write_ilsvrc_train_metadata

    count = write_ilsvrc_train_metadata(args.imagenet_root, args.out, force=args.force)
    print(f"wrote {args.out / 'ILSVRC' / 'train'} ({count} images)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsolbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"wsolbench {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_evaluate(subparsers)
    _add_prepare(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except WsolbenchError as error:
        print(f"wsolbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wsolbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
