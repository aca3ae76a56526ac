"""The `wsolbench` command: one entry point, one subcommand per job.

    wsolbench evaluate   score maps + metadata -> the protocol's metrics (stable interface)
    wsolbench prepare    generate the synthetic dataset, or write ILSVRC train metadata
    wsolbench train      train a method (+ DA-WSOL), score the test split, write a run folder
    wsolbench quickstart the embedded default: synthetic data, CAM with and without DA-WSOL, on the CPU
    wsolbench collect    run folders and Optuna trials -> the DuckDB store;  wsolbench runs: its comparison
    wsolbench report     the store -> one self-contained HTML page and its tables as CSV
    wsolbench bench      the timing-regression gate over benchmarks/ (exit 1 names each regression)

Errors a user can fix are printed as one line (`wsolbench: error: <file>:<line>: ...`) with exit
status 2; nothing is written on error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
    p = subparsers.add_parser("prepare", help="the pipeline's prepare stage, the synthetic dataset, or ILSVRC train "
                                              "metadata")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{stage,synthetic,ilsvrc-train}")
    st = kinds.add_parser("stage", help="the prepare stage of dvc.yaml: the dataset a params file's prepare section "
                                        "names",
                          description="prepare.dataset synthetic: generate the embedded default into prepare.out "
                                      "(the section's other keys are the generator's seed and sizes). CUB, ILSVRC, "
                                      "OpenImages: check every image (and mask) of every split under the local "
                                      "folders the config section names (config.data_root, config.mask_root) and "
                                      "write their metadata into <prepare.out>/metadata (ILSVRC train listed from "
                                      "<data_root>/train) with <prepare.out>/prepared.json. The output folder is "
                                      "replaced whole, or left as it was on an error.")
    st.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file (default params.yaml)")
    st.add_argument("--quiet", action="store_true")
    st.set_defaults(run=_run_prepare_stage)
    s = kinds.add_parser("synthetic", help="generate the embedded default dataset (deterministic from a seed)",
                         description="Write images, masks and metadata (datasets SyntheticBoxes and "
                                     "SyntheticMasks) of a small synthetic WSOL dataset into --out.")
    s.add_argument("--out", type=Path, required=True, help="output folder (replaced only if --force)")
    s.add_argument("--seed", type=int, default=0)
    # The sizes, for miniatures of the miniature (the pipeline's tests); left out, each is the embedded
    # default's (datasets/synthetic.py: 10 classes of 60/10/20, a source task of 20 classes of 60/10).
    for name, text in (("num-classes", "WSOL classes"), ("train-per-class", "train images per WSOL class"),
                       ("val-per-class", "val images per WSOL class"), ("test-per-class", "test images per WSOL class"),
                       ("source-classes", "source-task classes (0: no source task)"),
                       ("source-train-per-class", "source-task train images per class"),
                       ("source-val-per-class", "source-task val images per class")):
        s.add_argument(f"--{name}", type=int, default=None, help=f"{text} (default: the embedded default's)")
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
        sizes = {name: getattr(args, name) for name in (
            "num_classes", "train_per_class", "val_per_class", "test_per_class", "source_classes",
            "source_train_per_class", "source_val_per_class") if getattr(args, name) is not None}
        try:
            summary = synthetic.generate(args.out, seed=args.seed, replace=args.force, progress=callback, **sizes)
        except ValueError as error:  # a size or seed out of range, said in flag terms
            raise WsolbenchError(f"prepare synthetic: {str(error).replace('_', '-')}") from None
    finally:
        if bar is not None:
            bar.close()
    counts = ", ".join(f"{split} {count}" for split, count in summary.images.items())
    print(f"wrote {args.out}: {summary.num_classes} classes, images {counts}; datasets SyntheticBoxes and "
          f"SyntheticMasks (--data-root {summary.image_root} --metadata-root {summary.metadata_root} "
          f"--mask-root {summary.mask_root}), and the source task SyntheticSource for `wsolbench pretrain`")
    return 0


def _run_prepare_stage(args: argparse.Namespace) -> int:
    from wsolbench.prepare import prepare_stage

    bars: dict[str, object] = {}

    def progress(what: str, done: int, total: int) -> None:
        from tqdm import tqdm
        bar = bars.get(what)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[what] = tqdm(desc=what, unit="img", total=total, file=sys.stderr, dynamic_ncols=True)
        bar.n = done
        bar.refresh()
    try:
        summary = prepare_stage(args.params, progress=None if args.quiet else progress)
    finally:
        for bar in bars.values():
            bar.close()
    print(summary)
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


CONFIG_HELP = ("config values (flags override them): a TOML file, a YAML file, or a section of one "
               "(FILE.yaml:KEY.PATH, e.g. params.yaml:config, the pipeline's); keys are the flags' names with "
               "underscores, a YAML null leaves a key unset")
# The help of each config field's train flag; the flags themselves come from TrainConfig's fields,
# so every field is settable, by the same name, from a flag and from a --config TOML file.
_FIELD_HELP = {
    "dataset": "dataset folder name under the metadata root (any name)",
    "data_root": "folder the image ids are relative to",
    "metadata_root": "metadata root (default: the real metadata shipped with wsolbench)",
    "mask_root": "folder the mask paths of a mask dataset are relative to",
    "train_split": "split folder trained on (default train)",
    "val_split": "split folder evaluated at the --eval-frequency cadence (default val)",
    "test_split": "split folder scored at the end, with the last checkpoint (default test)",
    "method": "WSOL method (default cam)",
    "method_options": "a method hyper-parameter, e.g. --method-option drop_rate=0.5 (repeatable)",
    "uda": "DA-WSOL's domain adaption loss (default none)",
    "profile": "reference profile: heads and LR groups (default auto: DA, or WE for methods only the "
               "wsolevaluation code has, acol and spg)",
    "backbone": "resnet50, vgg16, inception_v3, resnet18, or resnet10_half (the embedded default's)",
    "pretrained": "imagenet (from torchvision's local cache only), none, or a .pth path (e.g. the "
                  "weights.pth of `wsolbench pretrain`)",
    "large_feature_map": "the large feature map (28x28 at 224 px instead of 14x14, spec §3)",
    "lambda1": "weight of the domain loss L_d",
    "lambda2": "weight of the Universum loss L_u",
    "start_epoch": "DA-WSOL is active after this 0-based epoch (default 0; -1: from the first epoch)",
    "assigner_mode": "target sample assigner: sequential (exact, the reference) or batched (faster)",
    "source_samples": "n_s, source pixels sampled per image (spec §5.3; default 32)",
    "target_samples": "n_t, target pixels sampled per image (spec §5.3; default 32)",
    "use_domain_loss": "the domain loss L_d (--no-domain-loss: the ablation without it)",
    "use_universum_loss": "the Universum loss L_u (--no-universum-loss: the ablation without it)",
    "use_assigner": "the target sample assigner (--no-assigner: MMD between sampled pixels and z)",
    "epochs": "training epochs",
    "batch_size": "training batch size: the global batch, divided evenly across the processes under "
                  "torchrun, so a recipe's 32 means the same on any number of GPUs",
    "lr": "base learning rate",
    "lr_decay_frequency": "LR x0.1 at the start of every 1-indexed epoch divisible by this (spec §6.1)",
    "lr_classifier_ratio": "LR multiplier of the classifier group (spec §3: 10)",
    "weight_decay": "weight decay (on every parameter, spec §6.1)",
    "momentum": "SGD momentum (spec §6.1: 0.9)",
    "optimizer": "sgd: the references' nesterov SGD (default); adamw: for training from scratch",
    "image_size": "crop size; evaluation happens at this size (default 224)",
    "eval_frequency": "evaluate val every N epochs",
    "eval_batch_size": "batch size when scoring val and test",
    "cam_curve_interval": "the evaluator's threshold step (default 0.001, the protocol's)",
    "box_metric": "headline box metric: v2 MaxBoxAccV2 (default) or v1 MaxBoxAcc",
    "save_scoremaps": "write the test split's score maps into the run folder (default on)",
    "seed": "seed of training (shuffles, augmentation, initialisation)",
    "device": "auto: cuda when available",
    "workers": "data-loading worker processes",
    "precision": "bf16: autocast (mixed precision)",
    "channels_last": "channels-last memory format",
    "out": "run folder",
}
# The field that opens each group of flags in --help (groups follow the field order of TrainConfig).
_FIELD_GROUPS = {"dataset": "data", "method": "model", "lambda1": "DA-WSOL (spec §5)",
                 "epochs": "optimisation (spec §6.1)", "eval_frequency": "evaluation (spec §2)",
                 "seed": "runtime"}
# Spellings of the ablation flags from before the flags were generated (paper Table 3's names).
_ABLATION_FLAGS = {"--no-domain-loss": "use_domain_loss", "--no-universum-loss": "use_universum_loss",
                   "--no-assigner": "use_assigner"}


def settable_fields() -> list[str]:
    """The TrainConfig fields a flag or a TOML key sets (all but the derived ones)."""
    from wsolbench.config import DERIVED_FIELDS, TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in DERIVED_FIELDS]


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """--config and --quiet, then one flag per config field: --field-name; booleans as --flag/--no-flag.
    Values are parsed and checked by the config (TrainConfig.validate), as a TOML file's are."""
    from wsolbench.config import FIELD_CHOICES, TrainConfig, flag_for

    p.add_argument("--config", metavar="FILE[:SECTION]", help=CONFIG_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    defaults = TrainConfig()
    group = p
    for name in settable_fields():
        if name in _FIELD_GROUPS:
            group = p.add_argument_group(_FIELD_GROUPS[name])
        flag, help_text = flag_for(name), _FIELD_HELP.get(name)
        if name == "method_options":
            group.add_argument(flag, dest=name, action="append", default=None, metavar="NAME=VALUE", help=help_text)
        elif isinstance(getattr(defaults, name), bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "{" + ",".join(FIELD_CHOICES[name]) + "}" if name in FIELD_CHOICES else name.upper()
            group.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)
    for flag, name in _ABLATION_FLAGS.items():
        p.add_argument(flag, dest=name, action="store_const", const=False, help=argparse.SUPPRESS)


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a WSOL method (optionally with DA-WSOL), then score the test split",
        description="Train a WSOL method on <data-root>/<image_id> with the metadata of "
                    "<metadata-root>/<dataset>/{train,val,test}/, evaluate val at the recipe's cadence and the "
                    "test split at the end (last checkpoint), writing metrics.json, history.json, checkpoints "
                    "and test score maps into --out. Defaults come from the spec's recipe for the dataset and "
                    "backbone; a --config file (TOML, or YAML or a section of one; keys: the flags' names with "
                    "underscores) and flags override them. Runs unchanged under torchrun (e.g. `torchrun "
                    "--nproc_per_node 8 -m wsolbench train ...`): DistributedDataParallel, one GPU per process, "
                    "--batch-size the global batch, BatchNorm over the global batch, val/test scored in shares "
                    "with exact combined counts, rank 0 writing the run folder.")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last epoch checkpoint")
    p.add_argument("--restart-if-changed", action="store_true",
                   help="with --resume: a folder left by a run of other settings starts over at epoch 0 instead of "
                        "being refused (the DVC pipeline's cells, rerun because their settings changed)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the data and the pretrained weights, print the run record "
                        "(run_id, identity, config) as one JSON object on stdout, and write nothing")
    p.add_argument("--lambdas-from", type=Path, metavar="BEST_JSON",
                   help="train the best lambda1/lambda2 of a `wsolbench tune` study (its best.json); the other "
                        "settings (flags, --config) must give the study's training setting, which is checked")
    _add_config_flags(p)
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


def config_from_args(args: argparse.Namespace):
    """The resolved TrainConfig of `wsolbench train`'s flags and --config file."""
    from wsolbench.config import resolve_config, value_from_flag

    values = {}
    for name in settable_fields():
        value = getattr(args, name)
        if name == "method_options" and value is not None:
            value = dict(_parse_option(text) for text in value)
        elif isinstance(value, str):
            value = value_from_flag(name, value)
        values[name] = value
    return resolve_config(values, args.config)


def _run_train(args: argparse.Namespace) -> int:
    from wsolbench.experiment import dry_run, train_and_evaluate

    config = config_from_args(args)
    if args.lambdas_from is not None:
        for flag, name in (("--lambda1", "lambda1"), ("--lambda2", "lambda2")):
            if getattr(args, name) is not None:
                raise WsolbenchError(f"{flag}: --lambdas-from {args.lambdas_from} sets it")
        from wsolbench.tune import with_best_lambdas

        config = with_best_lambdas(config, args.lambdas_from)
    if args.restart_if_changed and not args.resume:
        raise WsolbenchError("--restart-if-changed applies to --resume: pass both")
    if args.dry_run:
        print(json.dumps(dry_run(config, resume=args.resume, restart_if_changed=args.restart_if_changed)))
        return 0
    from wsolbench import distributed

    # Under torchrun (README "Scaling out"): one process per GPU, this one's place from torchrun's
    # environment; without it a single process.
    group = distributed.from_environment(config.device)
    try:
        train_and_evaluate(config, resume=args.resume, log=lambda line: print(line, flush=True),
                           progress_factory=None if args.quiet else _Bar, restart_if_changed=args.restart_if_changed,
                           group=group)
    finally:
        distributed.shutdown(group)
    return 0


def _add_pretrain(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a backbone on a classification source task (the embedded default's ImageNet)",
        description="Train CAM (profile WE: GAP and a linear classifier) from scratch on the classification "
                    "split <metadata-root>/<dataset>/train (default dataset SyntheticSource, the source task "
                    "`wsolbench prepare synthetic` writes, whose classes are disjoint from the WSOL classes), "
                    "report val top-1, and write <out>/weights.pth (torchvision names, trunk and fc) and "
                    "<out>/pretrain.json. `wsolbench train --pretrained <out>/weights.pth` fine-tunes it, as the "
                    "references fine-tune ImageNet weights. Defaults: the source-task recipe; flags as for "
                    "`wsolbench train`. With --weights imagenet nothing is trained: torchvision's cached "
                    "ImageNet file for --backbone is found (never downloaded), loaded once into the trunk, and "
                    "named with its sha256 in <out>/pretrain.json, for runs with --pretrained imagenet (the "
                    "paper settings' pretrain stage).")
    p.add_argument("--weights", choices=("trained", "imagenet"), default="trained",
                   help="trained: pretrain on the source task (default); imagenet: record torchvision's cached "
                        "ImageNet weights instead")
    _add_config_flags(p)
    p.set_defaults(run=_run_pretrain, dataset="SyntheticSource", method="cam", profile="WE")


def _run_pretrain(args: argparse.Namespace) -> int:
    from wsolbench.pretrain import pretrain, record_imagenet

    if args.weights == "imagenet" and args.data_root is None:
        args.data_root = "(not read: nothing is trained)"  # TrainConfig requires one; the record holds none
    config = config_from_args(args)
    if args.weights == "imagenet":
        record_imagenet(config, log=lambda line: print(line, flush=True))
        return 0
    pretrain(config, log=lambda line: print(line, flush=True), progress_factory=None if args.quiet else _Bar)
    return 0


def _add_setting(subparsers) -> None:
    from wsolbench.settings import SETTINGS

    p = subparsers.add_parser(
        "setting", help="write params.yaml for a paper setting (CUB/ILSVRC/OpenImages x ResNet50/InceptionV3/VGG16)",
        description="Write the params file of a paper setting (spec §6.2-6.3) for `dvc repro`: the embedded "
                    "default's pipeline on local image folders, ImageNet weights from torchvision's cache, the "
                    "recipes from wsolbench's recipe table. The file it replaces must be committed and "
                    "unmodified, or one this command wrote, unless --force. `git checkout params.yaml` returns "
                    "to the embedded default.")
    p.add_argument("name", nargs="?", choices=list(SETTINGS), metavar="NAME",
                   help=f"one of {', '.join(SETTINGS)}")
    p.add_argument("--data-root", type=Path, help="the dataset's image folder (see --list)")
    p.add_argument("--mask-root", type=Path, help="OpenImages: the folder its mask paths are relative to")
    p.add_argument("--out", type=Path, default=Path("params.yaml"), help="the params file (default params.yaml)")
    p.add_argument("--force", action="store_true", help="replace --out even if it has edits of your own")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the settings and what --data-root is for each")
    what.add_argument("--print", action="store_true", help="print the file instead of writing it")
    p.set_defaults(run=_run_setting)


def _run_setting(args: argparse.Namespace) -> int:
    from wsolbench.settings import DATA_ROOT_HELP, SETTINGS, render, setting_named, write_setting

    if args.list:
        for setting in SETTINGS.values():
            masks = " --mask-root MASKS" if setting.needs_masks else ""
            print(f"{setting.name:24} {setting.title:24} profile {setting.profile:4}  --data-root "
                  f"{DATA_ROOT_HELP[setting.dataset]}{masks}")
        return 0
    if args.name is None:
        raise WsolbenchError("wsolbench setting: name a setting (wsolbench setting --list shows them)")
    if args.print:
        setting = setting_named(args.name)
        mask_root = args.mask_root or ("MASK_ROOT" if setting.needs_masks else None)
        print(render(setting, args.data_root or "DATA_ROOT", mask_root), end="")
        return 0
    if args.data_root is None:
        raise WsolbenchError(f"wsolbench setting {args.name}: pass --data-root, the local image folder")
    path = write_setting(args.name, args.data_root, args.mask_root, args.out, force=args.force)
    print(f"wrote {path}: {setting_named(args.name).title}; `dvc repro` runs it")
    return 0


def _add_quickstart(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="the embedded default: generate the synthetic dataset, pretrain on its source task, "
                           "fine-tune CAM with and without DA-WSOL on the CPU, and print their metrics side by side",
        description="Generate the synthetic dataset into <out>/data (once), pretrain the backbone on its source "
                    "task into <out>/pretrained (once), fine-tune each method with and without DA-WSOL (MMD) on "
                    "SyntheticBoxes with the synthetic recipe, and print a table of test metrics and timings. "
                    "Every run folder is kept under <out>; finished steps are reused, killed runs resumed.")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--methods", default="cam", help="comma-separated methods (default cam)")
    p.add_argument("--uda", default="none,mmd", help="comma-separated domain adaption losses (default none,mmd)")
    p.add_argument("--dataset", default="SyntheticBoxes", choices=("SyntheticBoxes", "SyntheticMasks"))
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset, of pretraining and of training")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_quickstart)


def _run_quickstart(args: argparse.Namespace) -> int:
    from wsolbench.config import resolve_config
    from wsolbench.experiment import train_and_evaluate
    from wsolbench.pretrain import embedded_default
    from wsolbench.runfolder import RunFolder

    log = lambda line: print(line, flush=True)  # noqa: E731
    progress = None if args.quiet else _Bar
    locations, weights = embedded_default(args.out, seed=args.seed, device=args.device, log=log,
                                          progress_factory=progress)
    locations["device"] = args.device
    rows = []
    for method in args.methods.split(","):
        for uda in args.uda.split(","):
            run_dir = args.out / f"{method}-{uda}"
            folder = RunFolder(run_dir)
            if folder.is_complete():
                print(f"{run_dir}: done already, reusing its metrics", flush=True)
                rows.append(folder.read_metrics())
                continue
            config = resolve_config({**locations, "dataset": args.dataset, "method": method, "uda": uda,
                                     "epochs": args.epochs, "seed": args.seed, "pretrained": str(weights),
                                     "out": str(run_dir)})
            rows.append(train_and_evaluate(config, resume=not folder.is_empty(), log=log, progress_factory=progress))
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


def _add_collect(subparsers) -> None:
    p = subparsers.add_parser(
        "collect", help="collect run folders (and Optuna trials) into the DuckDB store",
        description="Walk each RUN_ROOT for run folders (a folder with config.json) and write their run records, "
                    "final metrics, per-epoch history and timings into one DuckDB file, with the paper's published "
                    "figures beside them. Collecting again adds nothing; a changed run replaces its rows. "
                    "Partial (no metrics.json) and corrupt folders are named on stderr and skipped.")
    p.add_argument("run_roots", nargs="+", type=Path, metavar="RUN_ROOT", help="folder of run folders, or a run folder")
    p.add_argument("--store", type=Path, default=Path("results/wsolbench.duckdb"),
                   help="the DuckDB file (default results/wsolbench.duckdb; created if absent)")
    p.add_argument("--optuna-storage", metavar="URL",
                   help="also collect every study's trials: an Optuna storage URL (sqlite:///tune.db) or a "
                        "journal file path")
    p.add_argument("--pictures", type=int, default=6, metavar="N",
                   help="store each run's score map on N fixed test images (the first image of each of the first N "
                        "classes) with its ground truth and prediction, for the report's pictures; 0: none "
                        "(default 6)")
    p.set_defaults(run=_run_collect)


def _run_collect(args: argparse.Namespace) -> int:
    from wsolbench.store import collect

    if args.pictures < 0:
        raise WsolbenchError(f"--pictures must be >= 0 (got {args.pictures})")
    summary = collect(args.run_roots, args.store, optuna_storage=args.optuna_storage, pictures=args.pictures)
    print(summary.line())
    return 0


def _add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="the timing-regression gate: run benchmarks/, compare ratios to calibration with the baseline",
        description="Run the pytest-benchmark suite of a wsolbench checkout (benchmarks/test_benchmarks.py), divide "
                    "every median by the calibration workload measured in the same run, and compare each ratio "
                    "with the committed baseline (benchmarks/baseline.json). Exit 0 when nothing regressed, 1 "
                    "naming each regressed benchmark and its factor. Without a baseline the gate says so and "
                    "passes. --update-baseline runs the suite --runs times and rewrites the baseline, thresholds "
                    "from the measured run-to-run spread.")
    p.add_argument("--benchmarks", type=Path, default=Path("benchmarks"), metavar="DIR",
                   help="the folder holding test_benchmarks.py (default: benchmarks, from the checkout's root)")
    p.add_argument("--baseline", type=Path, default=None, help="the baseline file (default DIR/baseline.json)")
    p.add_argument("--update-baseline", action="store_true", help="rewrite the baseline instead of comparing")
    p.add_argument("--runs", type=int, default=3, help="suite runs behind a new baseline (default 3)")
    p.add_argument("--pool", action="store_true",
                   help="with --update-baseline: add this host's runs to the machine's entry instead of replacing "
                        "it, the ratios and thresholds then taken over every host's runs (another VM of the same "
                        "CPU model whose ratios differ)")
    p.add_argument("--store", type=Path, default=None,
                   help="also record this run's medians and ratios in the DuckDB store (table benchmark_results, "
                        "keyed by commit and machine), for the report's timing history")
    p.add_argument("--quiet", action="store_true", help="print only the verdict lines")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from wsolbench import bench

    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    if args.update_baseline:
        path = args.baseline or args.benchmarks / bench.BASELINE_FILE
        baseline = bench.write_baseline(args.benchmarks, runs=args.runs, log=log, baseline_path=path,
                                        pool=args.pool)
        thresholds = baseline["threshold"].values()
        print(f"wrote {path} for this machine: {len(baseline['ratios'])} benchmarks from {baseline['runs']} runs on "
              f"{baseline['hosts']} host(s) of {baseline['machine']}; thresholds "
              f"{min(thresholds):.2f}x-{max(thresholds):.2f}x")
        return 0
    if args.pool:
        raise WsolbenchError("--pool applies to --update-baseline: pass both")
    report = bench.run_gate(args.benchmarks, args.baseline, log=log)
    if args.store is not None:
        from wsolbench.store import record_benchmarks

        record_benchmarks(args.store, bench.result_rows(report, args.benchmarks))
    print(report.text())
    return 1 if report.failed else 0


def _add_store_argument(p: argparse.ArgumentParser) -> None:
    """--store for the commands that read the store (the pipeline's path by default)."""
    p.add_argument("--store", type=Path, default=Path("results/wsolbench.duckdb"),
                   help="the DuckDB file (default results/wsolbench.duckdb)")


def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="render the store as one self-contained HTML page (and its tables as CSV)",
        description="Render the DuckDB store alone (no run folder, image or Optuna storage is read) into OUT/index.html, "
                    "a page with every figure inline that opens from disk, and the same tables as CSV beside it: the "
                    "paper's Tables 1-4 beside the store's runs, the embedded default's runs apart, DA-WSOL against "
                    "each base method with the seeds' spread, Table 4's timings as ratios to CAM, the λ1/λ2 study, "
                    "pictures (paper Fig. 4), per-threshold curves, training curves and provenance. OUT is replaced "
                    "atomically.")
    _add_store_argument(p)
    p.add_argument("--out", type=Path, default=Path("results/report"), help="the report folder (default results/report)")
    p.add_argument("--quiet", action="store_true", help="print only the last line")
    p.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from wsolbench.reports.report import render_report

    summary = render_report(args.store, args.out, log=(lambda line: None) if args.quiet else
                            (lambda line: print(line, file=sys.stderr, flush=True)))
    print(summary.line())
    return 0


def _add_runs(subparsers) -> None:
    p = subparsers.add_parser(
        "runs", help="the store's comparison: mean ± std over seeds per setting, the paper's figure beside it",
        description="Print, per setting (runs that differ by seed only) and metric of the test split, the seed "
                    "count, the mean and sample std over seeds, and the paper's figure with its table where the "
                    "paper has one (never for the embedded default's generated data). Timings are shown with "
                    "their ratio to the same device's CAM baseline, as spec §7 compares them.")
    _add_store_argument(p)
    p.add_argument("--dataset", help="only this dataset")
    p.add_argument("--method", help="only this method")
    p.add_argument("--uda", help="only this domain adaption loss (none, mmd, dann)")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="print the rows as CSV")
    output.add_argument("--json", action="store_true", help="print the rows as one JSON array")
    p.set_defaults(run=_run_runs)


def _run_runs(args: argparse.Namespace) -> int:
    from wsolbench.store import comparison_csv, comparison_rows, format_comparison

    rows = comparison_rows(args.store, dataset=args.dataset, method=args.method, uda=args.uda)
    if args.json:
        print(json.dumps(rows))
    elif args.csv:
        sys.stdout.write(comparison_csv(rows))
    else:
        print(format_comparison(rows))
    return 0


def _add_tune(subparsers) -> None:
    # Defaults live in wsolbench.tune.TuneSettings (not imported here: it loads optuna and torch);
    # an option left out is None and keeps the default there.
    p = subparsers.add_parser(
        "tune", help="tune DA-WSOL's lambda1/lambda2 on the val split with Optuna (each trial a run folder)",
        description="Search lambda1 and lambda2 (log-uniform, seeded TPE, median pruning once DA-WSOL has "
                    "trained) for the training config given by the flags of `wsolbench train`, maximising the "
                    "last epoch's val MaxBoxAccV2 (boxes) or PxAP (masks); the test split is never read. Each "
                    "trial trains into <study-dir>/trials/<run_id>. Several processes on one storage share the "
                    "study; a killed worker's trial is failed and retried, resuming its folder. Writes "
                    "<study-dir>/best.json and prints the trial table.")
    p.add_argument("--study-dir", type=Path, required=True,
                   help="folder of the trial run folders, best.json and (by default) the study's storage")
    p.add_argument("--storage", metavar="URL|journal:PATH",
                   help="an Optuna RDB URL (any SQLAlchemy URL; default sqlite:///<study-dir>/study.db, for one "
                        "worker), or the journal file storage for parallel workers: journal:PATH, a PATH ending "
                        "in .log or .jsonl, or 'journal' for <study-dir>/study.log")
    p.add_argument("--study-name", help="default lambda-<dataset>-<method>-<uda>")
    p.add_argument("--n-trials", type=int,
                   help="stop once the study holds this many finished (COMPLETE or PRUNED) trials, over every "
                        "invocation and worker")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="start no new trial after SECONDS")
    p.add_argument("--lambda1-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="log-uniform range of lambda1 (default 0.03 3)")
    p.add_argument("--lambda2-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="log-uniform range of lambda2 (default 0.1 10)")
    p.add_argument("--sampler-seed", type=int, help="TPE seed; the k-th worker to join the study uses seed + k "
                                                    "(default 0)")
    p.add_argument("--prune", action=argparse.BooleanOptionalAction,
                   help="median pruning at val epochs after DA-WSOL's start epoch (default on)")
    p.add_argument("--prune-startup-trials", type=int, help="finished trials before any pruning (default 5)")
    p.add_argument("--heartbeat-interval", type=int, metavar="SECONDS",
                   help="how often a running trial says it is alive (default 30)")
    p.add_argument("--stale-after", type=int, metavar="SECONDS",
                   help="a running trial silent this long is failed and retried (default 120)")
    p.add_argument("--max-retry", type=int, help="retries of a trial whose worker died (default 3)")
    _add_config_flags(p)
    p.set_defaults(run=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from wsolbench.tune import TuneSettings, format_trials, tune

    for flag, name in (("--out", "out"), ("--lambda1", "lambda1"), ("--lambda2", "lambda2")):
        if getattr(args, name) is not None:
            raise WsolbenchError(f"{flag}: tune sets it per trial (trial folders live under --study-dir; the "
                                 f"lambdas are searched in --lambda1-range / --lambda2-range)")
    args.out = str(args.study_dir / "trials")  # a placeholder: each trial gets <study-dir>/trials/<run_id>
    config = config_from_args(args)
    given = {name: getattr(args, name) for name in (
        "n_trials", "timeout", "study_name", "storage", "lambda1_range", "lambda2_range", "sampler_seed", "prune",
        "prune_startup_trials", "heartbeat_interval", "stale_after", "max_retry") if getattr(args, name) is not None}
    for name in ("lambda1_range", "lambda2_range"):
        if name in given:
            given[name] = tuple(given[name])
    settings = TuneSettings(study_dir=args.study_dir, **given)
    record = tune(config, settings, log=lambda line: print(line, flush=True),
                  progress_factory=None if args.quiet else _Bar)
    print()
    print(format_trials(record))
    return 0


SUBCOMMANDS = {"evaluate": _add_evaluate, "setting": _add_setting, "prepare": _add_prepare, "pretrain": _add_pretrain,
               "train": _add_train, "quickstart": _add_quickstart, "collect": _add_collect, "report": _add_report,
               "bench": _add_bench, "runs": _add_runs, "tune": _add_tune}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` the parser of that one subcommand (same help, same errors).

    Building every subcommand imports what their defaults need (the config system, ...): about
    0.05-0.08 s of a `wsolbench evaluate` process that needs none of it (issue 11).
    """
    parser = argparse.ArgumentParser(prog="wsolbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"wsolbench {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in SUBCOMMANDS.items():
        if only is None or name == only:
            add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.run is not _run_train:
            # torchrun would start N copies that each did the whole job (README "Scaling out").
            raise WsolbenchError(f"`wsolbench {argv[0]}` runs as one process; of the subcommands only `train` "
                                 f"runs under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']})")
        return args.run(args)
    except WsolbenchError as error:
        print(f"wsolbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wsolbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
