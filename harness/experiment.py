"""One training run, end to end: config -> data -> model -> trainer -> score maps -> evaluator -> files.

Writes into the run folder (`--out`):
  config.json         the resolved config, versions, device (written when the run starts)
  checkpoints/last.pt the latest epoch: weights, optimizer, DA-WSOL state, history (for --resume)
  history.json        per epoch: LR, loss, train accuracy and ms/image, val metrics at the cadence
  metrics.json        the final figures (written last: its presence means the run completed)
  scoremaps/<split>/  the test split's score maps, <image_id>.npy, for `wsolbench evaluate`
  predictions/<split>.csv   image_id,class predictions, for `wsolbench evaluate --predictions`
Every file is written atomically. Test metrics follow the references (spec §2.7): the last
checkpoint, every threshold optimised on the split reported. A val-calibrated threshold is added
as an extra figure, labelled as such.
"""
from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from wsolbench import __version__, atomic
from wsolbench.config import TrainConfig
from wsolbench.datasets.images import WSOLImageDataset, test_transform, train_transform
from wsolbench.datasets.metadata import read_split
from wsolbench.errors import WsolbenchError
from wsolbench.evaluator import BoxResult, MaskResult, SplitEvaluator
from wsolbench.methods import method_class
from wsolbench.methods.backbones import build_backbone
from wsolbench.methods.base import options_from
from wsolbench.methods.dawsol.wrapper import DomainAdaptation, DomainAdaptationOptions
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
    profile = cls.profiles[0] if config.profile == "auto" else config.profile
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


class Run:
    """The data, model and trainer of one run, and the files it writes."""

    def __init__(self, config: TrainConfig, log: Log = print):
        self.config = config
        self.log = log
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        seed_everything(config.seed)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.deterministic = True  # as the DA scripts (spec §6.1)
            torch.backends.cudnn.benchmark = False
        root = config.metadata_root
        self.train_meta = read_split(root, config.dataset, config.train_split)
        self.val_meta = read_split(root, config.dataset, config.val_split)
        self.test_meta = read_split(root, config.dataset, config.test_split)
        for meta in (self.val_meta, self.test_meta):
            if meta.localization == "none":
                raise WsolbenchError(f"{meta.file('localization')}: {meta.dataset}/{meta.split} has no boxes or "
                                     f"masks, so it cannot be evaluated")
            if meta.localization == "masks" and not config.mask_root:
                raise WsolbenchError(f"{meta.dataset}/{meta.split} has masks: pass --mask-root")
            if meta.localization == "masks":
                meta.check_mask_files(config.mask_root)
        self.num_classes = max(m.num_classes for m in (self.train_meta, self.val_meta, self.test_meta))
        size = config.image_size
        self.train_set = WSOLImageDataset(self.train_meta, config.data_root, train_transform(size))
        self.val_set = WSOLImageDataset(self.val_meta, config.data_root, test_transform(size))
        self.test_set = WSOLImageDataset(self.test_meta, config.data_root, test_transform(size))
        for dataset in (self.train_set, self.val_set, self.test_set):
            dataset.check_images()
        self.model = build_model(config, self.num_classes)
        self.method = getattr(self.model, "method", self.model)  # the WSOL method, unwrapped
        self.trainer = Trainer(self.model, config, self.device)
        self.history: list[EpochStats] = []
        self.val_history: list[dict[str, Any]] = []

    # --- data loaders -------------------------------------------------------------------------
    def train_loader(self, epoch: int) -> DataLoader:
        # The shuffle and the workers' seeds come from (seed, epoch) only, so a resumed run
        # sees the same batches as an uninterrupted one.
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return DataLoader(self.train_set, batch_size=self.config.batch_size, shuffle=True, generator=generator,
                          num_workers=self.config.workers, pin_memory=self.device.type == "cuda",
                          drop_last=False)

    def eval_loader(self, dataset: WSOLImageDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.config.eval_batch_size, shuffle=False,
                          num_workers=self.config.workers, pin_memory=self.device.type == "cuda")

    # --- scoring ------------------------------------------------------------------------------
    def score(self, dataset: WSOLImageDataset, save_to: Path | None = None,
              progress: Callable[[int], None] | None = None) -> tuple[BoxResult | MaskResult, dict[str, int], float]:
        """Evaluate a split: the model's maps of the GT class through the one evaluator.

        Returns the result, the predictions and the wall time per image of the whole path
        (forward pass, map post-processing, evaluation; paper Table 4's test measure, spec §7).
        """
        meta = dataset.metadata
        size = (self.config.image_size, self.config.image_size)
        evaluator = SplitEvaluator(meta, cam_curve_interval=self.config.cam_curve_interval,
                                   box_metric=self.config.box_metric, mask_root=self.config.mask_root,
                                   image_size=size, with_v1=True)
        predictions: dict[str, int] = {}

        def finish(image_id: str, cam: np.ndarray, predicted: int) -> None:
            scoremap = postprocess_cam(cam, size)
            evaluator.add(image_id, scoremap, predicted)
            if save_to is not None:
                save_scoremap(save_to, image_id, scoremap)

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
                    progress(len(indices))
            for future in pending:
                future.result()
        result = evaluator.result()
        return result, predictions, 1000.0 * (time.perf_counter() - start) / len(meta)

    # --- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def save_checkpoint(self, epoch: int) -> None:
        state = {"epoch": epoch, "trainer": self.trainer.state_dict(),
                 "history": [vars(s) for s in self.history], "val_history": self.val_history,
                 "config": self.config.to_dict()}
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_with(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self) -> int:
        """Restore the last checkpoint; returns the next epoch to train (0-based)."""
        try:
            state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        except FileNotFoundError:
            raise WsolbenchError(f"{self.checkpoint_path}: no checkpoint to resume from") from None
        saved = state["config"]
        for key in ("dataset", "method", "uda", "backbone", "epochs", "batch_size", "lr", "seed", "image_size"):
            if saved.get(key) != getattr(self.config, key):
                raise WsolbenchError(f"{self.checkpoint_path}: saved with {key}={saved.get(key)!r}, this run has "
                                     f"{key}={getattr(self.config, key)!r}; resume with the same settings")
        self.trainer.load_state_dict(state["trainer"])
        self.history = [EpochStats(**s) for s in state["history"]]
        self.val_history = state["val_history"]
        return state["epoch"] + 1


def figures_of(result: BoxResult | MaskResult) -> dict[str, Any]:
    """The run's headline figures (percent) from an evaluator result."""
    if isinstance(result, MaskResult):
        return {"pxap": result.pxap, "piou": result.piou, "top1_cls": result.top1_cls}
    summary = result.to_dict()
    return {"top1_cls": result.top1_cls, "top1_loc": summary.get("Top-1 Loc"),
            "gt_known_loc": summary["GT-known Loc"], "maxboxacc": result.max_box_acc,
            "maxboxacc_v2": result.max_box_acc_v2,
            "maxboxacc_v2_per_iou": {str(k): float(v.max()) for k, v in result.v2_acc.items()}}


def train_and_evaluate(config: TrainConfig, resume: bool = False, log: Log = print,
                       progress_factory: Callable[[str, int], Any] | None = None) -> dict[str, Any]:
    """Train a model as `config` says, score the test split, and write the run folder."""
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise WsolbenchError(f"{out}: the run folder exists and is not empty (pass --resume to continue it, "
                             f"or choose another --out)")
    run = Run(config, log)
    first_epoch = run.load_checkpoint() if resume and run.checkpoint_path.exists() else 0
    if resume and first_epoch == 0 and (out / "metrics.json").exists():
        raise WsolbenchError(f"{out}: this run already completed")
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "config.json", {"config": config.to_dict(), "environment": environment(run.device),
                                            "num_classes": run.num_classes, "profile": run.method.profile,
                                            "method_options": vars(run.method.options),
                                            "model": type(run.model).__name__})
    log(f"run {out}: {config.method}{'' if config.uda == 'none' else '+' + config.uda} on {config.dataset}, "
        f"{config.backbone}, {len(run.train_set)} train images, device {run.device}, recipe: {config.recipe}")
    if first_epoch:
        log(f"resuming at epoch {first_epoch + 1}/{config.epochs}")

    start_epoch_da = config.start_epoch if config.uda != "none" else 0
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
        if (epoch + 1) % config.eval_frequency == 0 or epoch + 1 == config.epochs:
            result, _, _ = run.score(run.val_set)
            figures = figures_of(result)
            run.val_history.append({"epoch": epoch + 1, **figures})
            line += "  val " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if isinstance(v, float))
        run.save_checkpoint(epoch)
        atomic.write_json(out / "history.json", {"train": [s.to_dict() for s in run.history], "val": run.val_history})
        log(line)

    # The test split, scored as the references do: the last checkpoint, thresholds optimised on it.
    bar = progress_factory(f"test {config.test_split}", len(run.test_set)) if progress_factory else None
    maps_root = out / "scoremaps" / config.test_split
    with atomic.directory(maps_root, replace=True) as tmp_maps:
        result, predictions, test_ms = run.score(run.test_set, save_to=tmp_maps if config.save_scoremaps else None,
                                                 progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        figures = figures_of(result)
    if not config.save_scoremaps:
        maps_root.rmdir()
    atomic.write_text(out / "predictions" / f"{config.test_split}.csv",
                      "image_id,class\n" + "".join(f"{i},{predictions[i]}\n" for i in run.test_meta.image_ids))
    atomic.write_json(out / "curves.json", result.curves())
    model = run.model
    metrics: dict[str, Any] = {
        "dataset": config.dataset, "split": config.test_split, "method": config.method, "uda": config.uda,
        "backbone": config.backbone, "profile": run.method.profile, "seed": config.seed,
        "checkpoint": "last", "cam_curve_interval": config.cam_curve_interval,
        **figures,
        "train_ms_per_image": median_ms_per_image(run.history, start_epoch_da),
        "test_ms_per_image": test_ms,
        "extra": {"val_selected_epoch": _best_val_epoch(run.val_history, result),
                  "empty_mmd_batches": getattr(model, "empty_domain_batches", None),
                  "note": "val_selected_epoch is the epoch with the best val localization (WE's 'best'); the "
                          "headline figures are the last checkpoint's, as in both references"},
        "config": config.to_dict(), "environment": environment(run.device), "num_classes": run.num_classes,
    }
    atomic.write_json(out / "metrics.json", metrics)
    log("test " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if isinstance(v, float)) +
        f"  (train {metrics['train_ms_per_image']:.1f} ms/img, test {test_ms:.1f} ms/img)")
    return metrics


def _best_val_epoch(val_history: list[dict[str, Any]], result: BoxResult | MaskResult) -> int | None:
    key = "pxap" if isinstance(result, MaskResult) else "maxboxacc_v2"
    scored = [(entry[key], entry["epoch"]) for entry in val_history if entry.get(key) is not None]
    return max(scored, key=lambda pair: (pair[0], -pair[1]))[1] if scored else None
