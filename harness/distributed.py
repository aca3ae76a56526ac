"""Training on several processes: torchrun, DistributedDataParallel, and how a run's work is shared.

    torchrun --nproc_per_node 8 -m wsolbench train --config run.toml --out runs/cam

`wsolbench train` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...)
through `from_environment` and is otherwise unchanged. What a run means does not depend on the
number of processes (issue 13):

- `--batch-size` is the global batch. Each step's global batch is the one a single process takes
  (the same shuffle of the same seed and epoch, `GlobalBatchSampler`), cut into contiguous shares,
  one per rank, in rank order; the shares differ in size by at most one image.
- Augmentation is drawn per image from (seed, epoch, image) (datasets.images), so an image gets
  the same crop on any rank and with any number of loader workers.
- BatchNorm statistics are those of the global batch (`synchronize_batch_norm`): torch's
  SyncBatchNorm on CUDA; on the CPU, where torch's refuses to run, `GlobalBatchNorm2d`.
- Each rank's loss is weighted by its share (`BatchShare.weight`) so that DDP's mean of the ranks'
  gradients is the gradient of the global batch's loss, also for an uneven last batch and for
  DA-WSOL's terms, whose means run over the valid images and Universum rows of the whole batch.
- Val and test are scored in contiguous shares of whole eval batches with no padding image, each
  image in the batch it has on one process; the evaluator's integer counts are combined across
  ranks (SplitEvaluator.combine), so the figures are one process's exactly.
- Rank 0 alone writes the run folder, logs and shows progress; the checks that decide whether a
  run may start are made there and their verdict shared (`on_main`), and a --resume's checkpoint is
  read there and broadcast, so ranks on other hosts need no view of the run folder.

What still differs from one process: the order of floating-point sums (BN statistics and
gradients summed in two parts), and the per-step randomness. Every rank draws it from the single
process's stream, so batch-level draws are the global batch's (CutMix mixes all ranks' shares or
none, with one box; ADL makes one drop-or-importance choice), but per-image draws repeat across
ranks at the same place in the share (HaS's grid, dropout), and CutMix pairs images within a share.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wsolbench.errors import WsolbenchError

T = TypeVar("T")

# torch.distributed.nn's autograd-aware all_reduce is deprecated in favour of functional collectives
# that have no backward; GlobalBatchNorm2d needs the backward, so the notice is not for our users.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the run's processes; world_size 1 is a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share_bounds(self, total: int) -> list[tuple[int, int]]:
        """Every rank's contiguous [start, stop) of `total` items, in rank order, sizes within one."""
        base, extra = divmod(total, self.world_size)
        bounds, start = [], 0
        for rank in range(self.world_size):
            stop = start + base + (1 if rank < extra else 0)
            bounds.append((start, stop))
            start = stop
        return bounds

    def share(self, total: int) -> range:
        start, stop = self.share_bounds(total)[self.rank]
        return range(start, stop)

    # --- collectives (identity on one process) --------------------------------------------
    def all_gather_object(self, obj: T) -> list[T]:
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def gather_object_to_main(self, obj: T) -> list[T] | None:
        """Every rank's `obj` in rank order on rank 0; None on the others."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_reduce_sum(self, values: Tensor) -> Tensor:
        if self.distributed:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def gather_batch(self, tensor: Tensor) -> tuple[Tensor, int]:
        """The ranks' tensors concatenated along dim 0 in rank order (their dim 0 may differ), and
        where this rank's rows start in it: (tensor, 0) on one process. No gradient flows back."""
        if not self.distributed:
            return tensor, 0
        sizes = [int(n) for n in self.all_reduce_sum(_one_hot_size(tensor, self))]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(gathered, sizes)]), sum(sizes[: self.rank])

    def on_main(self, work: Callable[[], T]) -> T:
        """`work()` run on rank 0 only, its result (or its WsolbenchError) on every rank: the checks
        and reads that must not race with rank 0's writes, or that need the run folder."""
        if not self.distributed:
            return work()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", work())
            except WsolbenchError as error:
                outcome = ("error", str(error))
        kind, value = self.broadcast_object(outcome)
        if kind == "error":
            raise WsolbenchError(value)
        return value


def _one_hot_size(tensor: Tensor, group: ProcessGroup) -> Tensor:
    sizes = torch.zeros(group.world_size, dtype=torch.int64, device=tensor.device)
    sizes[group.rank] = tensor.shape[0]
    return sizes


SINGLE_PROCESS = ProcessGroup()


def from_environment(device_name: str) -> ProcessGroup:
    """The process group torchrun's environment describes, initialised; SINGLE_PROCESS without it.

    The backend is NCCL when the run trains on CUDA, gloo on the CPU. Each process takes the GPU of
    its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise WsolbenchError("WORLD_SIZE is set but RANK is not: start distributed runs with torchrun") from None
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return ProcessGroup(rank, world_size, local_rank)


def shutdown(group: ProcessGroup) -> None:
    if group.distributed and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class BatchShare:
    """One step's share of the global batch: this rank's images among the batch's.

    weight(local, total) = world_size * local / total scales a mean over this rank's `local` items
    so that DDP's mean over ranks of the scaled losses is the mean over all `total` items (1 for
    every rank when the shares are equal)."""

    group: ProcessGroup
    images: int  # this rank's images in the step
    global_images: int  # the step's global batch

    def weight(self, local: int, total: int) -> float:
        return self.group.world_size * local / total if total else 0.0

    @property
    def loss_weight(self) -> float:
        return self.weight(self.images, self.global_images)


class GlobalBatchSampler:
    """The batches of one training epoch for one rank: the single process's batches (a shuffle
    seeded by (seed, epoch), cut into `batch_size` images, the last batch partial), each cut into
    the ranks' contiguous shares. A global batch with fewer images than ranks (the last one, rarely)
    is left out on every rank, so no rank ever steps on an empty share; `dropped` counts them."""

    def __init__(self, size: int, batch_size: int, seed: int, group: ProcessGroup = SINGLE_PROCESS):
        if batch_size % group.world_size:
            raise WsolbenchError(f"--batch-size {batch_size} is the global batch and must divide evenly across "
                                 f"the {group.world_size} processes")
        permutation = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        batches = [permutation[start : start + batch_size] for start in range(0, size, batch_size)]
        self.dropped = sum(len(b) for b in batches if len(b) < group.world_size)
        self.global_batches = [b for b in batches if len(b) >= group.world_size]
        self.group = group

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches:
            start, stop = self.group.share_bounds(len(batch))[self.group.rank]
            yield batch[start:stop]

    def __len__(self) -> int:
        return len(self.global_batches)

    def share_of(self, step: int) -> BatchShare:
        total = len(self.global_batches[step])
        start, stop = self.group.share_bounds(total)[self.group.rank]
        return BatchShare(self.group, stop - start, total)


# --- BatchNorm over the global batch ------------------------------------------------------------

class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the whole process group's batch: for gloo on the
    CPU, where torch's SyncBatchNorm refuses to run. Two all-reduces (the sum, then the squared
    deviations from the global mean) give the two-pass variance, and both go through
    torch.distributed.nn's autograd-aware all_reduce, so the backward pass is the global batch's as
    well (the arithmetic of torch's SyncBatchNorm). The arithmetic is float64, as the CPU
    BatchNorm kernel accumulates: in float32 the gradient of a nearly constant channel was 0.6% off
    on the generated dataset (tests/test_distributed.py compares with one process)."""

    process_group: Any = None  # set by synchronize_batch_norm

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Module's name)
        if not self.training or self.process_group is None:
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        channels = input.shape[1]
        dims = [0, 2, 3]
        values = input.double()
        count = torch.tensor([input.numel() // channels], dtype=torch.float64, device=input.device)
        sums = all_reduce(torch.cat([values.sum(dim=dims), count]), group=self.process_group)
        total = sums[-1]
        mean = sums[:channels] / total
        centred = values - mean[None, :, None, None]
        variance = all_reduce(centred.square().sum(dim=dims), group=self.process_group) / total
        output = centred * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            output = output * self.weight.double()[None, :, None, None] + self.bias.double()[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (self.momentum if self.momentum is not None
                            else 1.0 / float(self.num_batches_tracked))
                unbiased = variance.detach() * (total / (total - 1)).detach()
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        return output.to(input.dtype)


def synchronize_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """The model with every BatchNorm computing global-batch statistics (module docstring).

    Their collectives run in a process group of their own. They happen inside the backward pass,
    while DDP all-reduces gradient buckets as they fill; in one group the two must be issued in the
    same order on every rank, which follows each rank's autograd order, and DA-WSOL's graphs can
    differ between ranks (a rank with no valid image has no MMD term). A group of their own keeps
    them apart whatever the order (one group also passed the tests; this is the safe choice)."""
    group = dist.new_group(ranks=list(range(dist.get_world_size())))
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    return _convert(model, group)


def _convert(module: nn.Module, group: Any) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        converted = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        converted.process_group = group
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        converted.to(next(iter(module.state_dict().values())).device)
        return converted
    for name, child in module.named_children():
        setattr(module, name, _convert(child, group))
    return module
