"""The `wsolbench` command: one entry point, one subcommand per job.

    wsolbench evaluate   score maps + metadata -> the protocol's metrics (stable interface)
    wsolbench prepare    generate the synthetic dataset, or write ILSVRC train metadata
    wsolbench train      train a method (+ DA-WSOL), score the test split, write a run folder
    wsolbench quickstart the embedded default: synthetic data, CAM with and without DA-WSOL, on the CPU

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
        summary = synthetic.generate(args.out, seed=args.seed, replace=args.force, progress=callback)
    finally:
        if bar is not None:
            bar.close()
    counts = ", ".join(f"{split} {count}" for split, count in summary.images.items())
    print(f"wrote {args.out}: {summary.num_classes} classes, images {counts}; datasets SyntheticBoxes and "
          f"SyntheticMasks (--data-root {summary.image_root} --metadata-root {summary.metadata_root} "
          f"--mask-root {summary.mask_root})")
    return 0


def _run_prepare_ilsvrc(args: argparse.Namespace) -> int:
    from wsolbench.datasets.imagenet import write_ilsvrc_train_metadata

    count = write_ilsvrc_train_metadata(args.imagenet_root, args.out, force=args.force)
    print(f"wrote {args.out / 'ILSVRC' / 'train'} ({count} images)")
    return 0


class _Bar:
    """A tqdm bar on stderr showing images/s and the running loss."""

    def __init__(self, desc: str, total: int):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False,
                        mininterval=0.5)

    def update_batch(self, images: int, logs: dict) -> None:
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if isinstance(v, float)}, refresh=False)
        self.bar.update(images)

    def update(self, images: int) -> None:
        self.bar.update(images)

    def close(self) -> None:
        self.bar.close()


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a WSOL method (optionally with DA-WSOL), then score the test split",
        description="Train a WSOL method on <data-root>/<image_id> with the metadata of "
                    "<metadata-root>/<dataset>/{train,val,test}/, evaluate val at the recipe's cadence and the "
                    "test split at the end (last checkpoint), writing metrics.json, history.json, checkpoints "
                    "and test score maps into --out. Defaults come from the spec's recipe for the dataset and "
                    "backbone; a --config TOML file and flags override them.")
    p.add_argument("--config", type=Path, help="TOML file of config values (flags override it)")
    p.add_argument("--dataset", help="dataset folder name under the metadata root (any name)")
    p.add_argument("--data-root", help="folder the image ids are relative to")
    p.add_argument("--metadata-root", help="metadata root (default: the real metadata shipped with wsolbench)")
    p.add_argument("--mask-root", help="folder the mask paths of a mask dataset are relative to")
    p.add_argument("--method", help="WSOL method (default cam)")
    p.add_argument("--method-option", action="append", default=None, metavar="NAME=VALUE",
                   help="a method hyper-parameter, e.g. --method-option drop_rate=0.5 (repeatable)")
    p.add_argument("--uda", choices=("none", "mmd", "dann"), help="DA-WSOL's domain adaption loss (default none)")
    p.add_argument("--profile", choices=("auto", "DA", "WE"),
                   help="reference profile: heads and LR groups (default auto: DA, or WE for methods only "
                        "the wsolevaluation code has, acol and spg)")
    p.add_argument("--backbone", help="resnet50, vgg16, inception_v3 or resnet18")
    p.add_argument("--pretrained", help="imagenet (from torchvision's local cache only), none, or a .pth path")
    p.add_argument("--large-feature-map", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int, help="crop size; evaluation happens at this size (default 224)")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-decay-frequency", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--optimizer", choices=("sgd", "adamw"),
                   help="sgd: the references' nesterov SGD (default); adamw: for training from scratch")
    p.add_argument("--lambda1", type=float, help="weight of the domain loss L_d")
    p.add_argument("--lambda2", type=float, help="weight of the Universum loss L_u")
    p.add_argument("--start-epoch", type=int, help="DA-WSOL is active after this 0-based epoch (default 0)")
    p.add_argument("--assigner-mode", choices=("sequential", "batched"),
                   help="target sample assigner: sequential (exact, the reference) or batched (faster)")
    p.add_argument("--no-domain-loss", dest="use_domain_loss", action="store_const", const=False,
                   help="ablation: no L_d")
    p.add_argument("--no-universum-loss", dest="use_universum_loss", action="store_const", const=False,
                   help="ablation: no L_u")
    p.add_argument("--no-assigner", dest="use_assigner", action="store_const", const=False,
                   help="ablation: no target sample assigner (MMD between sampled pixels and z)")
    p.add_argument("--eval-frequency", type=int, help="evaluate val every N epochs")
    p.add_argument("--cam-curve-interval", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, help="data-loading worker processes")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16: autocast (mixed precision)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last epoch checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_train)


def _parse_option(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise WsolbenchError(f"--method-option expects NAME=VALUE, got {text!r}")
    for convert in (int, float):
        try:
            return name, convert(value)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(value.lower(), value)


def _run_train(args: argparse.Namespace) -> int:
    from wsolbench.config import resolve_config
    from wsolbench.experiment import train_and_evaluate

    values = {k: v for k, v in vars(args).items()
              if k not in ("config", "resume", "quiet", "run", "command", "method_option")}
    if args.method_option:
        values["method_options"] = dict(_parse_option(text) for text in args.method_option)
    config = resolve_config(values, args.config)
    train_and_evaluate(config, resume=args.resume, log=lambda line: print(line, flush=True),
                       progress_factory=None if args.quiet else _Bar)
    return 0


def _add_quickstart(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="the embedded default: generate the synthetic dataset, train CAM with and without "
                           "DA-WSOL on the CPU, and print their metrics side by side",
        description="Generate the synthetic dataset into <out>/data (once), train each method with and without "
                    "DA-WSOL (MMD) on SyntheticBoxes with the synthetic recipe, and print a table of test metrics "
                    "and timings. Every run folder is kept under <out>.")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--methods", default="cam", help="comma-separated methods (default cam)")
    p.add_argument("--uda", default="none,mmd", help="comma-separated domain adaption losses (default none,mmd)")
    p.add_argument("--dataset", default="SyntheticBoxes", choices=("SyntheticBoxes", "SyntheticMasks"))
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset and of training")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_quickstart)


def _run_quickstart(args: argparse.Namespace) -> int:
    from wsolbench.config import resolve_config
    from wsolbench.datasets import synthetic
    from wsolbench.experiment import train_and_evaluate

    data = args.out / "data"
    if not (data / "README.txt").exists():
        print(f"generating the synthetic dataset into {data}", flush=True)
        synthetic.generate(data, seed=args.seed)
    rows = []
    for method in args.methods.split(","):
        for uda in args.uda.split(","):
            run_dir = args.out / f"{method}-{uda}"
            if (run_dir / "metrics.json").exists():
                print(f"{run_dir}: done already, reusing its metrics", flush=True)
                rows.append(json.loads((run_dir / "metrics.json").read_text()))
                continue
            values = {"dataset": args.dataset, "data_root": str(data / "images"), "metadata_root": str(data / "metadata"),
                      "mask_root": str(data / "masks"), "method": method, "uda": uda, "epochs": args.epochs,
                      "seed": args.seed, "device": args.device, "out": str(run_dir)}
            config = resolve_config(values)
            rows.append(train_and_evaluate(config, resume=run_dir.exists(), log=lambda line: print(line, flush=True),
                                           progress_factory=None if args.quiet else _Bar))
    print()
    print(format_runs(rows))
    return 0


def format_runs(rows: list[dict]) -> str:
    """A table of run metrics (test split, percent) and timings."""
    masks = any("pxap" in r for r in rows)
    columns = (["pxap", "piou", "top1_cls"] if masks else
               ["top1_cls", "top1_loc", "gt_known_loc", "maxboxacc", "maxboxacc_v2"])
    header = ["method", *columns, "train ms/img", "test ms/img"]
    lines = [header]
    for r in rows:
        name = r["method"] + ("" if r["uda"] == "none" else f" + DA-WSOL ({r['uda']})")
        lines.append([name, *(f"{r[c]:.2f}" if r.get(c) is not None else "-" for c in columns),
                      f"{r['train_ms_per_image']:.1f}", f"{r['test_ms_per_image']:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsolbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"wsolbench {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_evaluate(subparsers)
    _add_prepare(subparsers)
    _add_train(subparsers)
    _add_quickstart(subparsers)
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
