"""Pretraining a backbone on a classification source task: the embedded default's ImageNet.

    wsolbench pretrain --data-root data/synthetic/images --metadata-root data/synthetic/metadata \
                       --out data/pretrained/resnet10_half

The references fine-tune ImageNet-pretrained backbones (spec §3.1-3.3, §6); the generated WSOL
dataset gets the same structure from its own source task (`SyntheticSource`: classes disjoint from
the WSOL classes, classification only). Pretraining is plain CAM in profile WE (GAP, then a linear
classifier) with one learning rate for every parameter, trained with the one trainer of
wsolbench; what it writes is a state dict with torchvision's names, trunk plus `fc.*`, which
`--pretrained PATH` loads as it loads an ImageNet file (the fc is dropped there, spec §3.1).

Writes into `--out`, each file atomically, the weights last:
  pretrain.json   the resolved config, per-epoch loss and train/val top-1, the weights' sha256
  weights.json    which weights the runs start from: file and sha256 (no timings, so it is the same
                  bytes whenever the weights are: the pipeline's train stages depend on it)
  weights.pth     the state dict

`--weights imagenet` (the paper settings' pretrain stage) trains nothing: it finds torchvision's
cached ImageNet file for the backbone (never downloaded), loads it into the trunk once to prove it
fits, and writes only weights.json naming that file and its sha256. The runs then load it with
`pretrained: imagenet`; weights.json is what DVC sees change when the file does.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from wsolbench import atomic
from wsolbench.config import TrainConfig
from wsolbench.datasets.images import WSOLImageDataset, test_transform, train_transform
from wsolbench.datasets.metadata import read_split
from wsolbench.errors import WsolbenchError
from wsolbench.methods.backbones.pretrained import sha256_of_file

WEIGHTS_FILE = "weights.pth"
RECORD_FILE = "pretrain.json"
WEIGHTS_RECORD_FILE = "weights.json"

Log = Callable[[str], None]


def pretrained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trunk's tensors by torchvision's names, plus the classifier as `fc.weight`/`fc.bias`."""
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.backbone.state_dict().items()
             if not name.startswith("inserted.")}
    state["fc.weight"] = model.head.fc.weight.detach().cpu().clone()
    state["fc.bias"] = model.head.fc.bias.detach().cpu().clone()
    return state


def top1(trainer, loader: DataLoader, labels: list[int]) -> float:
    """Top-1 classification accuracy (percent) in eval mode."""
    correct = 0
    for indices, logits, _ in trainer.predict(loader):
        correct += sum(int(row.argmax()) == labels[index] for index, row in zip(indices, logits))
    return 100.0 * correct / len(labels)


def pretrain(config: TrainConfig, log: Log = print, progress_factory: Callable[[str, int], Any] | None = None
             ) -> dict[str, Any]:
    """Train `config.method` (CAM, profile WE) on a classification split and write its weights."""
    # Imported here: experiment builds models and loaders, and pretraining shares them.
    from wsolbench.experiment import build_model, data_loader, environment, resolve_device
    from wsolbench.trainer import Trainer, seed_everything

    out = Path(config.out)
    if (out / WEIGHTS_FILE).exists():
        raise WsolbenchError(f"{out / WEIGHTS_FILE}: exists already (pretraining runs once; remove it to redo it)")
    if config.uda != "none":
        raise WsolbenchError("pretraining is classification only: --uda must be none")
    device = resolve_device(config.device)
    seed_everything(config.seed)
    train_meta = read_split(config.metadata_root, config.dataset, config.train_split)
    val_meta = read_split(config.metadata_root, config.dataset, config.val_split)
    num_classes = max(train_meta.num_classes, val_meta.num_classes)
    train_set = WSOLImageDataset(train_meta, config.data_root, train_transform(config.image_size))
    val_set = WSOLImageDataset(val_meta, config.data_root, test_transform(config.image_size))
    for dataset in (train_set, val_set):
        dataset.check_images()
    model = build_model(config, num_classes)
    trainer = Trainer(model, config, device)
    val_labels = [val_meta.class_labels[image_id] for image_id in val_meta.image_ids]
    log(f"pretrain {config.backbone} on {config.dataset}: {len(train_set)} train images, {num_classes} classes, "
        f"{config.epochs} epochs, device {device}")
    started = time.perf_counter()
    history = []
    for epoch in range(config.epochs):
        lr = trainer.start_epoch(epoch)
        bar = progress_factory(f"pretrain {epoch + 1}/{config.epochs}", len(train_set)) if progress_factory else None
        try:
            stats = trainer.train_epoch(data_loader(train_set, config, device, epoch), epoch,
                                        bar.update_batch if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        val_top1 = top1(trainer, data_loader(val_set, config, device), val_labels)
        history.append({"epoch": epoch + 1, "lr": lr, "loss": stats.loss, "train_top1": stats.train_top1,
                        "val_top1": val_top1, "train_ms_per_image": stats.ms_per_image})
        log(f"pretrain epoch {epoch + 1}/{config.epochs} lr {lr:.3g} loss {stats.loss:.4f} "
            f"train top-1 {stats.train_top1:.2f} val top-1 {val_top1:.2f} ({stats.ms_per_image:.1f} ms/img)")
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    staged = out / f".{WEIGHTS_FILE}.staged"
    torch.save(pretrained_state(model), staged)
    record = {"config": config.to_dict(), "environment": environment(device), "num_classes": num_classes,
              "history": history, "val_top1": history[-1]["val_top1"], "sha256": sha256_of_file(staged),
              "seconds": time.perf_counter() - started, "weights": WEIGHTS_FILE}
    atomic.write_json(out / RECORD_FILE, record)
    atomic.write_json(out / WEIGHTS_RECORD_FILE, {"weights": "trained", "backbone": config.backbone,
                                                   "path": str(weights), "sha256": record["sha256"]})
    staged.replace(weights)  # last: weights.pth present means pretraining completed
    log(f"wrote {weights} (val top-1 {record['val_top1']:.2f}, sha256 {record['sha256'][:12]}..., "
        f"{record['seconds']:.0f} s)")
    return record


def record_imagenet(config: TrainConfig, log: Log = print) -> dict[str, Any]:
    """weights.json for torchvision's cached ImageNet weights of `config.backbone` (spec §3: the
    references fine-tune these); nothing is trained and nothing downloaded."""
    from wsolbench.methods import method_class
    from wsolbench.methods.backbones import build_backbone

    out = Path(config.out)
    cls = method_class(config.method)
    # The same lookup, hash check and trunk load as a run's (methods/backbones/pretrained.py): a file
    # missing, truncated or of another architecture fails here, before any run starts.
    backbone = build_backbone(config.backbone, variant=cls.backbone_variant,
                              large_feature_map=config.large_feature_map, pretrained="imagenet")
    info = backbone.pretrained_info
    record = {"weights": "imagenet", "backbone": config.backbone, **info.to_record()}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / WEIGHTS_RECORD_FILE, record)
    log(f"wrote {out / WEIGHTS_RECORD_FILE}: {config.backbone} ImageNet weights {info.path} (sha256 {info.sha256[:12]}...)")
    return record


def embedded_default(root: Path, seed: int = 0, device: str = "auto", log: Log = print,
                     progress_factory: Callable[[str, int], Any] | None = None) -> tuple[dict[str, str], Path]:
    """The embedded default under `root`, made once: the generated dataset (`root/data`) and the
    backbone pretrained on its source task (`root/pretrained`). Returns the data locations as
    config values and the weights' path; quickstart and the benchmarks share it."""
    from wsolbench.config import resolve_config
    from wsolbench.datasets import synthetic

    data = root / "data"
    if not (data / "README.txt").exists():
        log(f"generating the synthetic dataset into {data}")
        synthetic.generate(data, seed=seed)
    locations = {"data_root": str(data / "images"), "metadata_root": str(data / "metadata"),
                 "mask_root": str(data / "masks")}
    weights = root / "pretrained" / WEIGHTS_FILE
    if not weights.exists():
        pretrain(resolve_config({**locations, "dataset": synthetic.SOURCE_DATASET, "method": "cam", "profile": "WE",
                                 "seed": seed, "device": device, "out": str(weights.parent)}),
                 log=log, progress_factory=progress_factory)
    return locations, weights
