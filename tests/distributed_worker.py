"""A torchrun worker for tests/test_distributed.py: `torchrun --standalone --nproc_per_node 2
tests/distributed_worker.py MODE ARGS_JSON`. Rank 0 writes what the test checks into ARGS_JSON's
"result" path as JSON (or torch.save for tensors). Run only by those tests, never by users."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from wsolbench import distributed
from wsolbench.config import resolve_config
from wsolbench.experiment import Run, figures_of, train_and_evaluate
from wsolbench.methods.base import TrainingProgress
from wsolbench.methods.dawsol.target_sample_assigner import TargetSampleAssigner

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.nn's deprecation notice


def tsa(group: distributed.ProcessGroup, args: dict) -> None:
    """Each rank assigns its share of random batches (uneven shares included); rank 0 saves every
    rank's state after every batch and its samples, to compare with one process on whole batches."""
    batches = torch.load(args["batches"])
    assigner = TargetSampleAssigner(args["num_classes"], args["channels"], source_samples=4, target_samples=4,
                                    seed=7, sequential_engine=args["engine"])
    record = []
    for features, labels in batches:
        share = group.share(features.shape[0])
        local = features[share.start : share.stop].clone().requires_grad_()
        samples = assigner.assign(local, local.mean(dim=(2, 3)), labels[share.start : share.stop], group)
        state = assigner.state_dict()
        states = group.all_gather_object({k: v for k, v in state.items()})
        mine = {"source": samples.source.detach(), "target": samples.target.detach(),
                "universum": samples.universum.detach(), "valid": samples.valid_images + share.start,
                "batch_valid": samples.batch_valid_count, "batch_universum": samples.batch_universum_rows}
        record.append({"states": states, "samples": group.all_gather_object(mine)})
    if group.is_main:
        torch.save(record, args["result"])


def score(group: distributed.ProcessGroup, args: dict) -> None:
    """Score val and test of a fixed checkpoint in shares; rank 0 writes the figures and predictions."""
    config = resolve_config(args["config"])
    run = Run(config, lambda _: None, True, group)
    run.trainer.load_state_dict(torch.load(args["checkpoint"], weights_only=False)["trainer"])
    out = {}
    for name, dataset in (("val", run.val_set), ("test", run.test_set)):
        result, predictions, _ = run.score(dataset)
        out[name] = {"figures": figures_of(result), "predictions": predictions, "curves": plain_data(result.curves())}
    if group.is_main:
        Path(args["result"]).write_text(json.dumps(out))


def anchors(group: distributed.ProcessGroup, args: dict) -> None:
    """DA-WSOL training steps through the Trainer: after every step every rank's TSA state is
    gathered and compared; rank 0 writes the comparisons and the steps' logs."""
    config = resolve_config(args["config"])
    run = Run(config, lambda _: None, True, group)
    steps = []
    for epoch in range(config.epochs):
        run.trainer.start_epoch(epoch)
        run.model.train()
        loader = run.train_loader(epoch)
        for index, (images, labels, _) in enumerate(loader):
            share = loader.batch_sampler.share_of(index)
            out = run.trainer.train_step(images, labels, TrainingProgress(epoch, index, len(loader), config.epochs,
                                                                          share))
            states = group.all_gather_object(run.model.assigner.state_dict())
            same = all(_equal(states[0], other) for other in states[1:])
            steps.append({"epoch": epoch, "same_state": same, "anchor_updates": int(states[0]["class_counts"].sum()),
                          "logs": {k: float(v) for k, v in out.logs.items()}})
    result, _, _ = run.score(run.test_set)
    if group.is_main:
        Path(args["result"]).write_text(json.dumps({"steps": steps, "figures": figures_of(result)}))


def matrix(group: distributed.ProcessGroup, args: dict) -> None:
    """Every method x uda trains two epochs under DDP (the first a warm-up, where DANN's domain
    classifier gets no gradient); after each epoch the ranks' weights and TSA states are compared."""
    cases = []
    for method, uda in args["cases"]:
        config = resolve_config({**args["config"], "method": method, "uda": uda})
        run = Run(config, lambda _: None, True, group)
        same = []
        for epoch in range(config.epochs):
            run.trainer.start_epoch(epoch)
            stats = run.trainer.train_epoch(run.train_loader(epoch), epoch)
            state = {name: tensor.detach().clone() for name, tensor in run.model.state_dict().items()}
            if uda != "none":
                state.update({f"assigner.{k}": v for k, v in run.model.assigner.state_dict().items()})
            states = group.all_gather_object(state)
            same.append(all(_equal(states[0], other) for other in states[1:]))
        cases.append({"method": method, "uda": uda, "same_after_each_epoch": same, "loss": stats.loss,
                      "logs": stats.logs})
    if group.is_main:
        Path(args["result"]).write_text(json.dumps(cases))


def killed_after_first_epoch(group: distributed.ProcessGroup, args: dict) -> None:
    """A torchrun job killed at the end of its first epoch (rank 0 dies; torchrun stops the rest)."""
    def log(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise SystemExit(3)
    train_and_evaluate(resolve_config(args["config"]), log=log, group=group)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def plain_data(value):
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


MODES = {"tsa": tsa, "score": score, "anchors": anchors, "matrix": matrix, "killed-after-first-epoch": killed_after_first_epoch}

if __name__ == "__main__":
    mode, arguments = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    process_group = distributed.from_environment("cpu")
    try:
        MODES[mode](process_group, arguments)
    finally:
        distributed.shutdown(process_group)
