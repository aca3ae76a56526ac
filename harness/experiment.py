"""One training run, end to end: config -> data -> model -> trainer -> score maps -> evaluator -> files.

Writes the run folder (`--out`) through wsolbench.runfolder, which owns its layout: config.json
(the run record: run_id, identity, resolved config, command, code commit, pretrained sha256) when
the run starts, checkpoints/last.pt and history.json every epoch, then the test split's score maps,
predictions and curves, and when the run completes checkpoints/final.pt (last.pt renamed: a resume
never continues from it) and metrics.json last. Nothing is written before every check has passed
(data, model, and for --resume the folder's identity), so a refused run leaves the folder as it
was; `dry_run` makes the same checks and writes nothing.

Test metrics follow the references (spec §2.7): the last checkpoint, every threshold optimised on
the split reported. A val-calibrated threshold is added as an extra figure, labelled as such.

`fit` is the first half alone (the same config.json, checkpoints and history.json, no test split:
its metadata and images are never opened), for tuning on val (wsolbench.tune); `on_val` sees each
epoch's val figures once that epoch's checkpoint and history are written.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from wsolbench import __version__, atomic
from wsolbench.config import TrainConfig, identity_change
from wsolbench.datasets.images import WSOLImageDataset, test_transform, train_transform
from wsolbench.datasets.metadata import SplitMetadata, read_split
from wsolbench.distributed import SINGLE_PROCESS, GlobalBatchSampler, ProcessGroup
from wsolbench.errors import WsolbenchError
from wsolbench.evaluator import BoxResult, MaskResult, SplitEvaluator
from wsolbench.methods import method_class
from wsolbench.methods.backbones import build_backbone
from wsolbench.methods.backbones.pretrained import sha256_of_file, weight_file
from wsolbench.methods.base import options_from
from wsolbench.methods.dawsol.wrapper import DomainAdaptation, DomainAdaptationOptions
from wsolbench.runfolder import RunFolder, run_record
from wsolbench.scoremaps import postprocess_cam, save_scoremap
from wsolbench.trainer import EpochStats, Trainer, median_ms_per_image, seed_everything

Log = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WsolbenchError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def build_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The method of `config.method` on its backbone, wrapped by DA-WSOL unless uda is 'none'."""
    cls = method_class(config.method)
    if config.backbone not in cls.backbones:
        raise WsolbenchError(f"method {config.method!r} has no {config.backbone} variant "
                             f"(it has {', '.join(cls.backbones)})")
    profile = config.profile  # resolve_config resolved "auto" before the recipe lookup (spec §4.7)
    if profile not in cls.profiles:
        raise WsolbenchError(f"method {config.method!r} has no profile {profile!r} (it has {', '.join(cls.profiles)})")
    options = options_from(cls, profile, config.method_options)
    backbone = build_backbone(config.backbone, variant=cls.backbone_variant, large_feature_map=config.large_feature_map,
                              pretrained=config.pretrained)
    method = cls(backbone, num_classes, profile, options)
    if profile == "WE" and config.dataset == "ILSVRC":
        method.load_pretrained_classifier()  # spec §3.1: WE loads the 1000-class fc on ILSVRC
    if config.uda == "none":
        return method
    return DomainAdaptation(method, DomainAdaptationOptions(
        uda=config.uda, lambda1=config.lambda1, lambda2=config.lambda2, start_epoch=config.start_epoch,
        assigner_mode=config.assigner_mode, source_samples=config.source_samples,
        target_samples=config.target_samples, domain_loss=config.use_domain_loss,
        universum_loss=config.use_universum_loss, assigner=config.use_assigner, seed=config.seed))


def environment(device: torch.device) -> dict[str, Any]:
    import cv2
    import torchvision
    info = {"wsolbench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
            "platform": platform.platform(), "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def data_loader(dataset: WSOLImageDataset, config: TrainConfig, device: torch.device,
                epoch: int | None = None, group: ProcessGroup = SINGLE_PROCESS) -> DataLoader:
    """The one way wsolbench batches a split: training epoch `epoch`'s global batches (this rank's
    share of each, harness/distributed.py), or in order (eval batch size, this rank's contiguous
    share of the split, no padding) when `epoch` is None."""
    pin = device.type == "cuda"
    if epoch is None:
        share = dataset
        if group.distributed:
            # Whole eval batches of the single process's, contiguous, per rank: an image is scored in
            # the same batch as on one process, so its map has the same last bits (a conv's sums can
            # depend on the batch an image is in, and PxAP's histograms see them).
            size = config.eval_batch_size
            batches = group.share(-(-len(dataset) // size))
            share = Subset(dataset, list(range(batches.start * size, min(batches.stop * size, len(dataset)))))
        return DataLoader(share, batch_size=config.eval_batch_size, shuffle=False, num_workers=config.workers,
                          pin_memory=pin)
    # The shuffle and every image's augmentation come from (seed, epoch) only, so a resumed run sees
    # the same batches as an uninterrupted one, whatever the number of workers or processes.
    seed = config.seed * 100_003 + epoch
    return DataLoader(dataset.seeded(seed), batch_sampler=GlobalBatchSampler(len(dataset), config.batch_size, seed, group),
                      num_workers=config.workers, pin_memory=pin, generator=torch.Generator().manual_seed(seed))


@dataclass
class RunData:
    """The three splits of a run: their metadata and image datasets (test: None when not opened)."""

    train_meta: SplitMetadata
    val_meta: SplitMetadata
    test_meta: SplitMetadata | None
    train_set: WSOLImageDataset
    val_set: WSOLImageDataset
    test_set: WSOLImageDataset | None

    @property
    def num_classes(self) -> int:
        return max(m.num_classes for m in (self.train_meta, self.val_meta, self.test_meta) if m is not None)


def open_data(config: TrainConfig, with_test: bool = True) -> RunData:
    """Read the splits' metadata and check that their images (and masks) are there: the checks
    before any model is built, for a run and `train --dry-run` alike. Without `with_test` the test
    split is not read at all (tuning on val must never see it); the class count then comes from
    train and val."""
    root = config.metadata_root
    splits = (config.train_split, config.val_split, config.test_split) if with_test else (config.train_split,
                                                                                          config.val_split)
    metas = [read_split(root, config.dataset, split) for split in splits]
    for meta in metas[1:]:
        if meta.localization == "none":
            raise WsolbenchError(f"{meta.file('localization')}: {meta.dataset}/{meta.split} has no boxes or "
                                 f"masks, so it cannot be evaluated")
        if meta.localization == "masks" and not config.mask_root:
            raise WsolbenchError(f"{meta.dataset}/{meta.split} has masks: pass --mask-root")
        if meta.localization == "masks":
            meta.check_mask_files(config.mask_root)
    size = config.image_size
    datasets = [WSOLImageDataset(metas[0], config.data_root, train_transform(size)),
                *(WSOLImageDataset(meta, config.data_root, test_transform(size)) for meta in metas[1:])]
    for dataset in datasets:
        dataset.check_images()
    if not with_test:
        metas.append(None)
        datasets.append(None)
    return RunData(*metas, *datasets)


class Run:
    """The data, model and trainer of one run, and the files it writes."""

    def __init__(self, config: TrainConfig, log: Log = print, with_test: bool = True,
                 group: ProcessGroup = SINGLE_PROCESS):
        self.config = config
        self.log = log
        self.group = group
        self.folder = RunFolder(config.out)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and group.distributed:
            self.device = torch.device("cuda", group.local_rank)  # torchrun: one GPU per process
        seed_everything(config.seed)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.deterministic = True  # as the DA scripts (spec §6.1)
            torch.backends.cudnn.benchmark = False
        data = open_data(config, with_test)
        self.train_meta, self.val_meta, self.test_meta = data.train_meta, data.val_meta, data.test_meta
        self.train_set, self.val_set, self.test_set = data.train_set, data.val_set, data.test_set
        self.num_classes = data.num_classes
        self.model = build_model(config, self.num_classes)
        self.method = getattr(self.model, "method", self.model)  # the WSOL method, unwrapped
        # The weights the backbone was loaded from: their sha256 is part of the run's identity.
        self.pretrained = self.method.backbone.pretrained_info
        self.record = run_record(config, self.pretrained.sha256 if self.pretrained is not None else None)
        self.trainer = Trainer(self.model, config, self.device, group)
        self.history: list[EpochStats] = []
        self.val_history: list[dict[str, Any]] = []

    # --- data loaders -------------------------------------------------------------------------
    def train_loader(self, epoch: int) -> DataLoader:
        return data_loader(self.train_set, self.config, self.device, epoch, self.group)

    def eval_loader(self, dataset: WSOLImageDataset) -> DataLoader:
        return data_loader(dataset, self.config, self.device, group=self.group)

    # --- scoring ------------------------------------------------------------------------------
    def score(self, dataset: WSOLImageDataset, save_to: Path | None = None,
              progress: Callable[[int], None] | None = None) -> tuple[BoxResult | MaskResult, dict[str, int], float]:
        """Evaluate a split: the model's maps of the GT class through the one evaluator.

        Returns the result, the predictions and the wall time per image of the whole path
        (forward pass, map post-processing, evaluation; paper Table 4's test measure, spec §7).
        Under torchrun each rank scores its share and the evaluators' counts are combined, so every
        rank returns the whole split's result; when rank 0 saves maps (its `save_to`), every rank's
        raw maps (small: the feature map's size) go to rank 0, which writes them all.
        """
        group = self.group
        save_maps = group.broadcast_object(save_to is not None)
        meta = dataset.metadata
        size = (self.config.image_size, self.config.image_size)
        evaluator = SplitEvaluator(meta, cam_curve_interval=self.config.cam_curve_interval,
                                   box_metric=self.config.box_metric, mask_root=self.config.mask_root,
                                   image_size=size, with_v1=True)
        predictions: dict[str, int] = {}

        others_maps: dict[str, np.ndarray] = {}  # this rank's raw maps, for rank 0 to write

        def finish(image_id: str, cam: np.ndarray, predicted: int) -> None:
            scoremap = postprocess_cam(cam, size)
            evaluator.add(image_id, scoremap, predicted)
            if save_maps and group.is_main:
                save_scoremap(save_to, image_id, scoremap)
            elif save_maps:
                others_maps[image_id] = cam

        start = time.perf_counter()
        # The maps are post-processed and evaluated by a thread pool while the next batch runs.
        with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 8))) as pool:
            pending = []
            for indices, logits, cams in self.trainer.predict(self.eval_loader(dataset)):
                for index, row, cam in zip(indices, logits, cams):
                    image_id = meta.image_ids[index]
                    predictions[image_id] = int(row.argmax())
                    pending.append(pool.submit(finish, image_id, cam, predictions[image_id]))
                if progress is not None:
                    progress(len(indices) * group.world_size)  # rank 0's progress stands for all
            for future in pending:
                future.result()
            if group.distributed:
                for rank, counts in enumerate(group.all_gather_object(evaluator.counts())):
                    if rank != group.rank:
                        evaluator.combine(counts)
                for part in group.all_gather_object(predictions):
                    predictions.update(part)
                if save_maps:
                    def write(image_id: str, cam: np.ndarray) -> None:
                        save_scoremap(save_to, image_id, postprocess_cam(cam, size))
                    for part in group.gather_object_to_main(others_maps) or []:
                        for future in [pool.submit(write, image_id, cam) for image_id, cam in part.items()]:
                            future.result()
        result = evaluator.result()
        return result, predictions, 1000.0 * (time.perf_counter() - start) / len(meta)

    # --- checkpoints ----------------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, Any]:
        return self.record["identity"]

    def save_checkpoint(self, epoch: int) -> None:
        self.folder.write_checkpoint({
            "epoch": epoch, "trainer": self.trainer.state_dict(), "history": [vars(s) for s in self.history],
            "val_history": self.val_history, "config": self.config.to_dict(), "run_id": self.record["run_id"],
            "identity": self.identity})

    def restore(self, state: dict[str, Any]) -> int:
        """Restore a checkpoint from `resume_state`; returns the next epoch to train (0-based)."""
        self.trainer.load_state_dict(state["trainer"])
        self.history = [EpochStats(**s) for s in state["history"]]
        self.val_history = state["val_history"]
        return state["epoch"] + 1


def check_folder_can_start(folder: RunFolder, resume: bool) -> None:
    """Refuse a folder that is not this run's to write: an existing one without --resume, a completed one."""
    if not resume and not folder.is_empty():
        raise WsolbenchError(f"{folder.path}: the run folder exists and is not empty (pass --resume to continue it, "
                             f"or choose another --out)")
    if resume and folder.is_complete():
        raise WsolbenchError(f"{folder.path}: this run already completed")


def resume_state(folder: RunFolder, identity: dict[str, Any], map_location: Any,
                 restart_if_changed: bool = False, log: Log | None = None) -> dict[str, Any] | None:
    """The checkpoint a --resume continues from, once it is known to be of this run's identity; None
    to start at epoch 0. A run killed before its first checkpoint left only config.json: its
    identity is checked there, so a resume never takes over another run's folder. With
    `restart_if_changed` a folder of another identity starts over at epoch 0 instead of being
    refused: the pipeline's cells, which DVC reruns because their settings changed, so that the
    checkpoint a killed earlier run left is obsolete."""
    saved_at = folder.checkpoint if folder.checkpoint.exists() else folder.config if folder.config.exists() else None
    if saved_at is None:
        return None
    state = folder.read_checkpoint(map_location) if saved_at == folder.checkpoint else None
    saved = state.get("identity") if state is not None else folder.read_config().get("identity")
    try:
        _refuse_another_identity(saved, identity, saved_at)
    except WsolbenchError as refused:
        if not restart_if_changed:
            raise
        if log is not None:
            log(f"starting over at epoch 1: {refused}")
        return None
    return state


def _refuse_another_identity(saved: Any, identity: dict[str, Any], where: Path) -> None:
    if not isinstance(saved, dict):
        raise WsolbenchError(f"{where}: holds no run identity (written by an older wsolbench), so a resume "
                             f"cannot be checked against it; start a new run with another --out")
    change = identity_change(saved, identity)
    if change:
        raise WsolbenchError(f"{where}: {change}; resume with the same settings")


def check_method(config: TrainConfig) -> None:
    """What build_model checks of the method, its backbone, profile and options, without building it."""
    cls = method_class(config.method)
    if config.backbone not in cls.backbones:
        raise WsolbenchError(f"method {config.method!r} has no {config.backbone} variant "
                             f"(it has {', '.join(cls.backbones)})")
    if config.profile not in cls.profiles:
        raise WsolbenchError(f"method {config.method!r} has no profile {config.profile!r} "
                             f"(it has {', '.join(cls.profiles)})")
    options_from(cls, config.profile, config.method_options)


def pretrained_weight_file(config: TrainConfig) -> Path | None:
    """The weight file `config.pretrained` names, where the backbone will load it from; None for "none".

    The backbone is built on the meta device (no memory, no initialisation cost) only to ask it,
    through the same lookup `load_pretrained` uses, where its weights live."""
    cls = method_class(config.method)
    with torch.device("meta"):
        backbone = build_backbone(config.backbone, variant=cls.backbone_variant,
                                  large_feature_map=config.large_feature_map, pretrained="none")
    located = weight_file(backbone, config.pretrained)
    return None if located is None else located[0]


def dry_run(config: TrainConfig, resume: bool = False, restart_if_changed: bool = False) -> dict[str, Any]:
    """The checks `train_and_evaluate` makes before training (run folder, device, data, method,
    pretrained weights, and for --resume the folder's identity), without building a model or
    writing anything. Returns the run record a real run writes into config.json."""
    folder = RunFolder(config.out)
    check_folder_can_start(folder, resume)
    resolve_device(config.device)
    open_data(config)
    check_method(config)
    weights = pretrained_weight_file(config)
    record = run_record(config, sha256_of_file(weights) if weights is not None else None)
    if resume:
        resume_state(folder, record["identity"], map_location="cpu", restart_if_changed=restart_if_changed)
    return record


def figures_of(result: BoxResult | MaskResult) -> dict[str, Any]:
    """The run's headline figures (percent) from an evaluator result."""
    if isinstance(result, MaskResult):
        return {"pxap": result.pxap, "piou": result.piou, "top1_cls": result.top1_cls}
    summary = result.to_dict()
    return {"top1_cls": result.top1_cls, "top1_loc": summary.get("Top-1 Loc"),
            "gt_known_loc": summary["GT-known Loc"], "maxboxacc": result.max_box_acc,
            "maxboxacc_v2": result.max_box_acc_v2,
            "maxboxacc_v2_per_iou": {str(k): float(v.max()) for k, v in result.v2_acc.items()}}


def fit(config: TrainConfig, resume: bool = False, log: Log = print,
        progress_factory: Callable[[str, int], Any] | None = None,
        on_val: Callable[[int, dict[str, Any]], None] | None = None, with_test: bool = True,
        restart_if_changed: bool = False, group: ProcessGroup = SINGLE_PROCESS) -> Run:
    """Train a model as `config` says, scoring val at the recipe's cadence, and write config.json,
    the checkpoint and history.json every epoch; returns the trained Run (not scored on test).

    `on_val(epoch, figures)` is called with the 1-based epoch number (history.json's) and its val
    figures, after that epoch's checkpoint and history are written: an exception raised there (a
    pruned Optuna trial) leaves a folder that `resume` continues from the next epoch. Without
    `with_test` the test split is never opened (`open_data`).

    Under torchrun (`group`) every rank trains and scores its share; rank 0 alone checks and writes
    the folder and logs, and a --resume's checkpoint is read there and broadcast."""
    folder = RunFolder(config.out)
    if not group.is_main:
        log, progress_factory = _silent, None
    group.on_main(lambda: check_folder_can_start(folder, resume))
    run = Run(config, log, with_test, group)
    map_location = run.device if not group.distributed else "cpu"
    state = group.on_main(lambda: resume_state(folder, run.identity, map_location, restart_if_changed, log)
                          if resume else None)
    first_epoch = run.restore(state) if state is not None else 0
    # The global batch's split across the processes (a --batch-size that does not divide is refused here).
    left_out = run.train_loader(first_epoch).batch_sampler.dropped if group.distributed else 0
    # Every check has passed: only now is anything in the folder written.
    if group.is_main:
        _write_run_config(folder, run)
    log(f"run {folder.path} ({run.record['run_id']}): {config.method}{'' if config.uda == 'none' else '+' + config.uda} "
        f"on {config.dataset}, {config.backbone}, {len(run.train_set)} train images, device {run.device}"
        f"{f' x {group.world_size} processes' if group.distributed else ''}, recipe: {config.recipe}")
    if first_epoch:
        log(f"resuming at epoch {first_epoch + 1}/{config.epochs}")
    if left_out:  # the same every epoch: it depends on the split's size only
        log(f"the last global batch of every epoch holds {left_out} image(s), fewer than the {group.world_size} "
            f"processes: it is left out (harness/distributed.py)")

    for epoch in range(first_epoch, config.epochs):
        lr = run.trainer.start_epoch(epoch)
        bar = progress_factory(f"epoch {epoch + 1}/{config.epochs}", len(run.train_set)) if progress_factory else None
        on_batch = bar.update_batch if bar is not None else None
        try:
            stats = run.trainer.train_epoch(run.train_loader(epoch), epoch, on_batch)
        finally:
            if bar is not None:
                bar.close()
        run.history.append(stats)
        line = (f"epoch {epoch + 1}/{config.epochs} lr {lr:.3g} loss {stats.loss:.4f} "
                f"train top-1 {stats.train_top1:.2f} ({stats.ms_per_image:.1f} ms/img)")
        figures = None
        if (epoch + 1) % config.eval_frequency == 0 or epoch + 1 == config.epochs:
            result, _, _ = run.score(run.val_set)
            figures = figures_of(result)
            run.val_history.append({"epoch": epoch + 1, **figures})
            line += "  val " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if isinstance(v, float))
        if group.is_main:
            run.save_checkpoint(epoch)
            folder.write_history([s.to_dict() for s in run.history], run.val_history)
        log(line)
        if figures is not None and on_val is not None:
            on_val(epoch + 1, figures)
    return run


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def _write_run_config(folder: RunFolder, run: Run) -> None:
    folder.write_config({**run.record, "environment": {**environment(run.device), "processes": run.group.world_size},
                         "num_classes": run.num_classes,
                         "profile": run.method.profile, "method_options": vars(run.method.options),
                         "model": type(run.model).__name__,
                         "pretrained": run.pretrained.to_record() if run.pretrained is not None else None})


def train_and_evaluate(config: TrainConfig, resume: bool = False, log: Log = print,
                       progress_factory: Callable[[str, int], Any] | None = None,
                       on_val: Callable[[int, dict[str, Any]], None] | None = None,
                       restart_if_changed: bool = False, group: ProcessGroup = SINGLE_PROCESS) -> dict[str, Any]:
    """Train a model as `config` says (`fit`), score the test split, and write the run folder
    (rank 0 alone under torchrun; every rank returns the metrics)."""
    if not group.is_main:
        log, progress_factory = _silent, None
    run = fit(config, resume, log, progress_factory, on_val, restart_if_changed=restart_if_changed, group=group)
    folder = run.folder
    start_epoch_da = config.start_epoch if config.uda != "none" else 0

    # The test split, scored as the references do: the last checkpoint, thresholds optimised on it.
    bar = progress_factory(f"test {config.test_split}", len(run.test_set)) if progress_factory else None
    maps_root = folder.scoremaps(config.test_split)
    with atomic.directory(maps_root, replace=True) if group.is_main else contextlib.nullcontext() as tmp_maps:
        result, predictions, test_ms = run.score(
            run.test_set, save_to=tmp_maps if config.save_scoremaps and group.is_main else None,
            progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        figures = figures_of(result)
    if not group.is_main:
        return {"run_id": run.record["run_id"], **figures}
    if not config.save_scoremaps:
        maps_root.rmdir()
    folder.write_predictions(config.test_split, predictions, run.test_meta.image_ids)
    folder.write_curves(result.curves())
    model = run.model
    metrics: dict[str, Any] = {
        "run_id": run.record["run_id"], "dataset": config.dataset, "split": config.test_split, "method": config.method, "uda": config.uda,
        "backbone": config.backbone, "profile": run.method.profile, "seed": config.seed,
        "checkpoint": "last", "cam_curve_interval": config.cam_curve_interval,
        **figures,
        "train_ms_per_image": median_ms_per_image(run.history, start_epoch_da),
        "test_ms_per_image": test_ms,
        "extra": {"val_selected_epoch": _best_val_epoch(run.val_history, result),
                  "empty_mmd_batches": getattr(model, "empty_domain_batches", None),
                  "note": "val_selected_epoch is the epoch with the best val localization (WE's 'best'); the "
                          "headline figures are the last checkpoint's, as in both references"},
        **run.record, "environment": {**environment(run.device), "processes": run.group.world_size},
        "num_classes": run.num_classes,
    }
    # Completed: the checkpoint is the final one, which no --resume continues from (runfolder.py), then
    # metrics.json, whose presence says so. Killed between the two, the folder trains again from epoch 0.
    folder.finalize_checkpoint()
    folder.write_metrics(metrics)
    log("test " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if isinstance(v, float)) +
        f"  (train {metrics['train_ms_per_image']:.1f} ms/img, test {test_ms:.1f} ms/img)")
    return metrics


def _best_val_epoch(val_history: list[dict[str, Any]], result: BoxResult | MaskResult) -> int | None:
    key = "pxap" if isinstance(result, MaskResult) else "maxboxacc_v2"
    scored = [(entry[key], entry["epoch"]) for entry in val_history if entry.get(key) is not None]
    return max(scored, key=lambda pair: (pair[0], -pair[1]))[1] if scored else None
