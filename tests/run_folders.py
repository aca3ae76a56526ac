"""Run folders written as training writes them (through RunFolder), without training: for the
store's and the report's tests."""
from __future__ import annotations

from pathlib import Path

from wsolbench.config import resolve_config, run_id, run_identity
from wsolbench.runfolder import RunFolder

DA_LOGS = {"L_c": 1.2, "L_d": 0.4, "L_u": 0.1, "lambda1_L_d": 0.12, "lambda2_L_u": 0.2, "valid_share": 0.75,
           "universum_pixels": 120.0, "fake_target_pixels": 60.0, "real_target_pixels": 76.0,
           "background_anchor_norm": 3.5}


def write_run(root: Path, name: str, *, dataset: str = "OpenImages", method: str = "cam", uda: str = "none",
              backbone: str = "resnet50", seed: int = 0, figures: dict | None = None, train_ms: float = 10.0,
              test_ms: float = 70.0, gpu: str | None = "NVIDIA H200", epochs: int = 2, **settings) -> RunFolder:
    """A completed run folder shaped as experiment.train_and_evaluate writes it."""
    folder = RunFolder(root / name)
    config = resolve_config({"dataset": dataset, "data_root": "images", "out": str(folder.path), "method": method,
                             "uda": uda, "backbone": backbone, "seed": seed, "epochs": epochs, **settings})
    identity = run_identity(config, "ab" * 32)
    record = {"run_id": run_id(identity), "identity": identity, "config": config.to_dict(),
              "pretrained_sha256": "ab" * 32, "command": ["wsolbench", "train", "--out", str(folder.path)],
              "code": {"commit": "0" * 40, "dirty": False}}
    environment = {"wsolbench": "0.1.0", "python": "3.11.7", "torch": "2.14.0", "torchvision": "0.29.0",
                   "numpy": "2.0", "opencv": "4.10", "platform": "Linux", "device": "cuda" if gpu else "cpu",
                   "cpu_threads": 2, **({"gpu": gpu} if gpu else {})}
    masks = dataset in ("OpenImages", "SyntheticMasks")
    if figures is None:
        figures = ({"pxap": 60.0, "piou": 45.0, "top1_cls": 70.0} if masks else
                   {"top1_cls": 70.0, "top1_loc": 50.0, "gt_known_loc": 65.0, "maxboxacc": 60.0,
                    "maxboxacc_v2": 62.0, "maxboxacc_v2_per_iou": {"30": 80.0, "50": 63.0, "70": 43.0}})
    folder.write_config({**record, "environment": environment, "num_classes": 100})
    train = [{"epoch": e, "lr": 1e-3, "loss": 1.5 - 0.1 * e, "train_top1": 40.0 + e, "train_ms_per_image": train_ms,
              **(DA_LOGS if uda != "none" else {})} for e in range(1, epochs + 1)]
    val = [{"epoch": e, **figures} for e in range(1, epochs + 1)]
    folder.write_history(train, val)
    folder.write_metrics({
        "run_id": record["run_id"], "dataset": dataset, "split": "test", "method": method, "uda": uda,
        "backbone": backbone, "profile": config.profile, "seed": seed, "checkpoint": "last",
        "cam_curve_interval": 0.001, **figures, "train_ms_per_image": train_ms, "test_ms_per_image": test_ms,
        "extra": {"val_selected_epoch": 1}, **record, "environment": environment, "num_classes": 100})
    return folder
