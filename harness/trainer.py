"""The training loop (spec §6.1), plain enough to read top to bottom.

    trainer = Trainer(model, config, device)
    for epoch in range(config.epochs):
        trainer.start_epoch(epoch)                       # LR schedule, per-epoch seeds
        stats = trainer.train_epoch(train_loader, epoch)
    for batch in trainer.predict(test_loader): ...      # logits and raw CAMs, eval mode

`model` is a WSOL method, or a method wrapped by DA-WSOL: both offer training_step, predict,
lr_multiplier, decays, extra_state. Nothing here knows which method it trains.

Optimiser: SGD, momentum 0.9, nesterov, weight decay on every parameter (BN and biases too), one
parameter group per learning-rate multiplier (spec §3: the classifier at x10). LR schedule: at the
start of 1-indexed epoch e the LR is lr0 * 0.1^floor(e / f) (spec §6.1), except for parameters
the model says never decay (DANN's domain classifier, spec §5.9).
"""
from __future__ import annotations

import contextlib
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from wsolbench.config import TrainConfig
from wsolbench.distributed import SINGLE_PROCESS, ProcessGroup, synchronize_batch_norm
from wsolbench.methods.base import TrainingProgress


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: every epoch's randomness depends on (seed, epoch) only, so a run
    resumed at epoch e draws exactly what the uninterrupted run drew."""
    return (seed * 1_000_003 + epoch * 7919) % (2 ** 31)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(epoch: int, decay_frequency: int) -> float:
    """0.1^floor(e / f) for the 1-indexed epoch e = epoch + 1 (spec §6.1, §8 item 13)."""
    return 0.1 ** ((epoch + 1) // decay_frequency)


@dataclass
class EpochStats:
    epoch: int
    lr: float
    loss: float
    train_top1: float  # on augmented batches in train mode (spec §2.4)
    images: int
    seconds: float
    logs: dict[str, float] = field(default_factory=dict)

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(self.images, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch + 1, "lr": self.lr, "loss": self.loss, "train_top1": self.train_top1,
                "train_ms_per_image": self.ms_per_image, **self.logs}


class _TrainingStep(nn.Module):
    """The model's training step as a forward pass, so that DistributedDataParallel, which hooks
    forward, reduces its gradients. Returns the loss first, where DDP looks for the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor, progress: TrainingProgress):
        out = self.model.training_step(images, labels, progress)
        return out.loss, out


class Trainer:
    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device,
                 group: ProcessGroup = SINGLE_PROCESS):
        self.group = group
        if group.distributed:  # BN over the global batch (harness/distributed.py), before the optimiser sees it
            model = synchronize_batch_norm(model, device)
        self.model = model.to(device)
        self.config = config
        self.device = device
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                key = (self.model.lr_multiplier(name), self.model.decays(name))
                groups.setdefault(key, []).append(parameter)
        # lr_classifier_ratio is the x10 of spec §3; a multiplier of 10 means "classifier group".
        param_groups = [{"params": params, "decays": decays,
                         "lr_multiplier": config.lr_classifier_ratio if multiplier == 10.0 else multiplier}
                        for (multiplier, decays), params in sorted(groups.items())]
        if config.optimizer == "sgd":  # the references' optimiser (spec §6.1)
            self.optimizer = torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, nesterov=True,
                                             weight_decay=config.weight_decay)
        else:  # AdamW: for training from scratch (the generated dataset); not in any reference
            self.optimizer = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)
        self.step = _TrainingStep(self.model)
        if group.distributed:
            # find_unused_parameters: DANN's domain classifier sits out the warm-up epochs, and a
            # method's branches may skip parameters on some steps.
            from torch.nn.parallel import DistributedDataParallel
            self.step = DistributedDataParallel(self.step, device_ids=[device.index] if device.type == "cuda" else None,
                                                find_unused_parameters=True)
        self.current_lr = config.lr
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                         if config.precision == "bf16" else contextlib.nullcontext())

    def start_epoch(self, epoch: int) -> float:
        """Set every group's LR for this 0-based epoch and seed its randomness; returns the base LR."""
        factor = lr_factor(epoch, self.config.lr_decay_frequency)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * group["lr_multiplier"] * (factor if group["decays"] else 1.0)
        # Every rank seeds the single process's stream: a step's batch-level draws (CutMix's mix and
        # box, ADL's drop-or-importance choice) are then the same on every rank, as for one batch
        # on one process, and so is the step's sequence of collectives (CutMix's two labellings
        # make two assigner calls). Per-image draws (HaS's grid, dropout) repeat across ranks at the
        # same place in the share (harness/distributed.py).
        seed_everything(epoch_seed(self.config.seed, epoch))
        self.current_lr = self.config.lr * factor
        return self.current_lr

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, progress: TrainingProgress):
        """One optimisation step on a batch already on the device: the method's training step
        (through DA-WSOL when wrapped), backward, optimiser step. Returns the step's output
        (loss, logits, logs). The benchmarks time exactly this."""
        with self.autocast:
            loss, out = self.step(images, labels, progress)
        if progress.share is not None:  # DDP averages the ranks' gradients: weight by the share
            loss = loss * progress.share.loss_weight
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return out

    def train_epoch(self, loader, epoch: int, on_batch: Callable[[int, dict], None] | None = None) -> EpochStats:
        self.model.train()
        iterations = len(loader)
        total_loss, correct, seen = 0.0, 0, 0
        logs_sum: dict[str, float] = {}
        start = time.perf_counter()
        share_of = getattr(loader.batch_sampler, "share_of", None) if self.group.distributed else None
        for batch_index, (images, labels, _) in enumerate(loader):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.config.channels_last:
                images = images.to(memory_format=torch.channels_last)
            share = share_of(batch_index) if share_of is not None else None
            out = self.train_step(images, labels, TrainingProgress(epoch, batch_index, iterations, self.config.epochs,
                                                                   share))
            batch = labels.shape[0]
            loss = float(out.loss.detach())
            total_loss += loss * batch
            correct += int((out.logits.detach().argmax(dim=1) == labels).sum())
            seen += batch
            for key, value in out.logs.items():
                logs_sum[key] = logs_sum.get(key, 0.0) + float(value) * batch
            if on_batch is not None:
                on_batch(batch, {"loss": loss, **out.logs})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if self.group.distributed:  # the epoch's figures over every rank's images
            keys = sorted(logs_sum)
            summed = self.group.all_reduce_sum(torch.tensor([total_loss, correct, seen, *(logs_sum[k] for k in keys)],
                                                            dtype=torch.float64, device=self.device))  # NCCL: on the GPU
            total_loss, correct, seen = float(summed[0]), int(summed[1]), int(summed[2])
            logs_sum = {key: float(value) for key, value in zip(keys, summed[3:])}
        return EpochStats(epoch, self.current_lr, total_loss / max(seen, 1), 100.0 * correct / max(seen, 1), seen, seconds,
                          {key: value / max(seen, 1) for key, value in logs_sum.items()})

    @torch.no_grad()
    def predict(self, loader) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(indices, logits, raw CAMs of the ground-truth class) per batch, in eval mode (spec §1.5)."""
        self.model.eval()
        for images, labels, indices in loader:
            images = images.to(self.device, non_blocking=True)
            if self.config.channels_last:
                images = images.to(memory_format=torch.channels_last)
            with self.autocast:
                logits, cams = self.model.predict(images, labels.to(self.device))
            yield indices.numpy(), logits.float().cpu().numpy(), cams.float().cpu().numpy()

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "extra": self.model.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.model.load_extra_state(state["extra"])


def median_ms_per_image(history: list[EpochStats], start_epoch: int) -> float:
    """Paper Table 4's train measure: the median epoch time per image, over the epochs after
    the warm-up (where DA-WSOL's loss is active), or all epochs if there are no others."""
    after = [s.ms_per_image for s in history if s.epoch > start_epoch]
    return statistics.median(after or [s.ms_per_image for s in history])
