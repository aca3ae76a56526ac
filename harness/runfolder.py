"""The run folder: its layout, its file names, and the one way to write and read them.

    folder = RunFolder("runs/cub-cam-mmd")
    folder.write_config(record)              # training writes through it
    metrics = folder.read_metrics()          # quickstart, the benchmarks (and collect) read through it

A run folder (`wsolbench train --out`) holds:
  config.json              the run record (see `run_record`), environment and model, written when
                           the run starts
  checkpoints/last.pt      the latest epoch of a run in progress: weights, optimizer, DA-WSOL state,
                           history, identity (what --resume continues from)
  checkpoints/final.pt     the same, of a completed run: last.pt renamed when the run completes, just
                           before metrics.json is written. A resume never continues from it, so a
                           folder whose metrics.json was removed (DVC removes a stage's outputs
                           before rerunning it, the checkpoints aside) trains again from epoch 0
                           with the code of now instead of only re-scoring the old weights
  history.json             per epoch: LR, loss, train accuracy and ms/image, val metrics at the cadence
  plots/train.json         history.json's train entries as a list of flat rows with the same keys
  plots/val.json           and its val entries (the per-IoU figures flattened), for `dvc plots`
  metrics.json             the final figures and the run record (written last: its presence means
                           the run completed)
  curves.json              the test split's per-threshold curves
  scoremaps/<split>/       the test split's score maps, <image_id>.npy, for `wsolbench evaluate`
  predictions/<split>.csv  image_id,class predictions, for `wsolbench evaluate --predictions`
Every file is written atomically (wsolbench.atomic). Metric keys are snake_case, as
experiment.figures_of names them, in history.json and metrics.json alike.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from wsolbench import atomic
from wsolbench.config import TrainConfig, run_id, run_identity
from wsolbench.errors import InputError, WsolbenchError


class RunFolder:
    """The files of one run folder, by role."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def history(self) -> Path:
        return self.path / "history.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def final_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "final.pt"

    def plots(self, phase: str) -> Path:
        """plots/train.json or plots/val.json: a list of flat rows, as DVC's plots read them."""
        return self.path / "plots" / f"{phase}.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def curves(self) -> Path:
        return self.path / "curves.json"

    def scoremaps(self, split: str) -> Path:
        return self.path / "scoremaps" / split

    def predictions(self, split: str) -> Path:
        return self.path / "predictions" / f"{split}.csv"

    def is_empty(self) -> bool:
        """True when the folder does not exist or holds nothing."""
        return not self.path.exists() or not any(self.path.iterdir())

    def is_complete(self) -> bool:
        return self.metrics.is_file()

    # --- writing ------------------------------------------------------------------------------
    def write_config(self, record: Mapping[str, Any]) -> None:
        atomic.write_json(self.config, record)

    def write_history(self, train: Sequence[Mapping[str, Any]], val: Sequence[Mapping[str, Any]]) -> None:
        atomic.write_json(self.history, {"train": list(train), "val": list(val)})
        # DVC's plots take a list of rows whose keys agree; history.json's two lists (val at its own
        # cadence, nested per-IoU figures, DA-WSOL logs from the epoch they start) are not that.
        for phase, entries in (("train", train), ("val", val)):
            atomic.write_json(self.plots(phase), plot_rows(entries))

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        atomic.write_json(self.metrics, metrics)

    def write_curves(self, curves: Mapping[str, Any]) -> None:
        atomic.write_json(self.curves, curves)

    def write_predictions(self, split: str, predictions: Mapping[str, int], image_ids: Sequence[str]) -> None:
        """image_id,class lines in the split's image order, as `wsolbench evaluate --predictions` reads them."""
        atomic.write_text(self.predictions(split),
                          "image_id,class\n" + "".join(f"{i},{predictions[i]}\n" for i in image_ids))

    def write_checkpoint(self, state: Mapping[str, Any]) -> None:
        import torch

        atomic.write_with(self.checkpoint, lambda tmp: torch.save(dict(state), tmp))

    def finalize_checkpoint(self) -> None:
        """The run completed: checkpoints/last.pt becomes checkpoints/final.pt (replacing an older one)."""
        os.replace(self.checkpoint, self.final_checkpoint)

    # --- reading ------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        return read_json_object(self.config)

    def read_history(self) -> dict[str, Any]:
        return read_json_object(self.history)

    def read_metrics(self) -> dict[str, Any]:
        return read_json_object(self.metrics)

    def read_curves(self) -> dict[str, Any]:
        return read_json_object(self.curves)

    def read_checkpoint(self, map_location: Any = "cpu", final: bool = False) -> dict[str, Any]:
        """checkpoints/last.pt (a run in progress), or with `final` checkpoints/final.pt (a completed run's)."""
        import torch

        path = self.final_checkpoint if final else self.checkpoint
        try:
            # Not weights_only: the state holds plain Python (history, identity) beside the
            # tensors, and wsolbench wrote the file itself.
            state = torch.load(path, map_location=map_location, weights_only=False)
        except FileNotFoundError:
            raise WsolbenchError(f"{path}: no checkpoint to {'score' if final else 'resume from'}") from None
        except Exception as error:  # zip, pickle and I/O errors all mean a damaged file
            message = " ".join(str(error).split())[:200]
            raise InputError(path, f"not a readable checkpoint ({type(error).__name__}: {message}); "
                                   f"it may be incomplete") from None
        if not isinstance(state, dict):
            raise InputError(path, f"not a wsolbench checkpoint (holds a {type(state).__name__})")
        return state


def plot_rows(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows with one set of keys (a key an entry lacks is null), nested mappings flattened as
    `<key>_iou30` etc. (the store's names for the per-IoU figures), lists left out."""
    rows = []
    for entry in entries:
        row: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, Mapping):
                suffix = "_iou" if key == "maxboxacc_v2_per_iou" else "_"
                prefix = key.removesuffix("_per_iou")
                row.update({f"{prefix}{suffix}{inner}": item for inner, item in value.items()})
            elif not isinstance(value, (list, tuple)):
                row[key] = value
        rows.append(row)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key) for key in keys} for row in rows]


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "does not exist") from None
    except UnicodeDecodeError:
        raise InputError(path, "not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise InputError(path, f"not valid JSON ({error.msg}, column {error.colno})", error.lineno) from None
    if not isinstance(value, dict):
        raise InputError(path, f"expected a JSON object, found a {type(value).__name__}")
    return value


# ---- the run record ------------------------------------------------------------------------------

def source_version() -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout wsolbench runs from; None when it is not one (an
    installed wheel) or git is missing. Dirty counts changes to tracked files only, as `git
    describe --dirty` does: run folders and data kept inside a checkout are not code, and neither
    is dvc.lock, which every `dvc repro` rewrites (a fresh clone's pipeline would otherwise record
    all but its first stage as run from uncommitted code)."""
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                              timeout=30)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                 ":(top,exclude)dvc.lock"], cwd=source, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(),
            "dirty": None if status.returncode != 0 else bool(status.stdout.strip())}


def run_record(config: TrainConfig, pretrained_sha256: str | None) -> dict[str, Any]:
    """What identifies and reproduces a run, as config.json and metrics.json hold it (and
    `train --dry-run` prints it): run_id, identity, the resolved config, the sha256 of the
    pretrained weights, the command line and the code's git commit."""
    identity = run_identity(config, pretrained_sha256)
    return {"run_id": run_id(identity), "identity": identity, "config": config.to_dict(),
            "pretrained_sha256": pretrained_sha256, "command": list(sys.argv), "code": source_version()}
