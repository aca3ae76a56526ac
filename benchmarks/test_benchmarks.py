"""The timing benchmarks behind the regression gate (`wsolbench bench`), apart from the unit tests.

    python -m pytest benchmarks/test_benchmarks.py --benchmark-enable --benchmark-json OUT.json

Each benchmark times the project's own code, never a copy of it:
  calibration        a fixed workload (a small convolution forward/backward and a numpy sort),
                     timed before every benchmark (the fastest of 5, in its extra_info): the gate
                     divides each benchmark's median by the calibration measured next to it, so a
                     slower or busier machine moves the ratios alike and only a change to the code
                     moves one; calibration_first/_last time it as benchmarks, for the record
  evaluator_*        SplitEvaluator.add over 300 CAM-like 224x224 maps: MaxBoxAccV2 at interval
                     0.001 (the fast engine's per-map kernel), and PxAP's histograms
  train_step[M-U]    Trainer.train_step (the method's step through DA-WSOL, backward, the
                     optimiser) of every registered method M with each UDA loss U, resnet10_half at
                     64 px, batch 8, on the CPU; a method added to the registry is benchmarked too
  tsa_step[E]        the target sample assigner (sequential, the reference semantics) on one
                     batch's features, by each engine E (per_image: what the CPU runs)
  data_loading       one pass of the train DataLoader (PIL decode, the train transform) over 64
                     generated images
  evaluate_start     a whole `wsolbench evaluate` process on one map: its start is most of it
Sizes are small so the whole suite runs in about a minute on two cores.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wsolbench.config import resolve_config
from wsolbench.datasets.metadata import MaskAnnotation, SplitMetadata
from wsolbench.evaluator import SplitEvaluator
from wsolbench.experiment import build_model
from wsolbench.methods.base import TrainingProgress
from wsolbench.methods.dawsol.target_sample_assigner import SEQUENTIAL_ENGINES
from wsolbench.methods.dawsol.wrapper import UDA_METHODS
from wsolbench.methods.registry import available_methods
from wsolbench.trainer import Trainer

ROUNDS = dict(rounds=11, warmup_rounds=2, iterations=1)
# The calibration runs longer and warms up more: every ratio divides by it.
CALIBRATION_ROUNDS = dict(rounds=15, warmup_rounds=5, iterations=1)
MAPS = 300
EVAL_SIZE = (224, 224)


def _calibration_workload() -> None:
    torch.manual_seed(0)
    weights = torch.randn(32, 32, 3, 3, requires_grad=True)
    inputs = torch.randn(8, 32, 32, 32)
    for _ in range(3):
        torch.nn.functional.conv2d(inputs, weights, padding=1).square().mean().backward()
    np.sort(np.random.default_rng(0).random(400_000))


@pytest.fixture(scope="module", autouse=True)
def warm_process():
    """One thread (the second vCPU of a shared VM comes and goes; one thread's time does not depend
    on it), and torch's allocator warmed before anything is timed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(10):
        _calibration_workload()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def local_calibration(benchmark):
    """The calibration workload timed right before each benchmark (the fastest of 5), recorded in
    its extra_info: the gate divides the benchmark by it, so a burst of load on the machine
    that slows the benchmark slows its own calibration too. (The calibration_* benchmarks are the
    same workload timed as benchmarks, for the record.)"""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        _calibration_workload()
        times.append(time.perf_counter() - start)
    benchmark.extra_info["calibration_s"] = min(times)


def test_calibration_first(benchmark):
    benchmark.pedantic(_calibration_workload, **CALIBRATION_ROUNDS)


# ---- the evaluator -------------------------------------------------------------------------------

def _cam_like_maps(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth maps as CAMs look after the protocol's upsampling: a few Gaussian blobs and a little
    noise on a 14x14 grid, bicubic to 224x224, min-max normalised."""
    import cv2

    rng = np.random.default_rng(seed)
    grid = np.mgrid[0:14, 0:14].astype(np.float64)
    maps = []
    for _ in range(count):
        small = rng.random((14, 14)) * 0.1
        for _ in range(rng.integers(1, 4)):
            centre, width = rng.random(2) * 14, 1 + rng.random() * 3
            small += np.exp(-((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2) / (2 * width ** 2))
        big = cv2.resize(small, EVAL_SIZE[::-1], interpolation=cv2.INTER_CUBIC)
        big -= big.min()
        maps.append(big / big.max())
    return maps


@pytest.fixture(scope="module")
def box_split():
    rng = np.random.default_rng(1)
    ids = [f"img{i:04d}.jpg" for i in range(MAPS)]
    boxes = {}
    for image_id in ids:
        x0, y0 = rng.integers(0, 150, 2)
        boxes[image_id] = [(int(x0), int(y0), int(x0 + rng.integers(20, 70)), int(y0 + rng.integers(20, 70)))]
    metadata = SplitMetadata(folder=Path("bench"), dataset="bench", split="test", image_ids=ids,
                             class_labels={i: 0 for i in ids}, image_sizes={i: EVAL_SIZE for i in ids},
                             localization="boxes", boxes=boxes)
    return metadata, dict(zip(ids, _cam_like_maps(MAPS)))


def test_evaluator_maxboxacc_v2(benchmark, box_split):
    metadata, maps = box_split

    def evaluate():
        evaluator = SplitEvaluator(metadata, cam_curve_interval=0.001)
        for image_id, scoremap in maps.items():
            evaluator.add(image_id, scoremap)
        return evaluator.result()

    benchmark.pedantic(evaluate, rounds=5, warmup_rounds=1, iterations=1)


@pytest.fixture(scope="module")
def mask_split(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("masks")
    rng = np.random.default_rng(2)
    ids = [f"img{i:04d}.jpg" for i in range(MAPS)]
    masks = {}
    for image_id in ids:
        mask = np.zeros(EVAL_SIZE, dtype=np.uint8)
        x0, y0 = rng.integers(0, 150, 2)
        mask[y0:y0 + rng.integers(20, 70), x0:x0 + rng.integers(20, 70)] = 255
        Image.fromarray(mask).save(root / f"{image_id}.png")
        masks[image_id] = MaskAnnotation(mask_paths=(f"{image_id}.png",), ignore_path=None)
    # The metadata in memory; its localization.txt on disk too, which error messages would name.
    (root / "localization.txt").write_text("".join(f"{i},{i}.png,\n" for i in ids))
    metadata = SplitMetadata(folder=root, dataset="bench", split="test", image_ids=ids,
                             class_labels={i: 0 for i in ids}, image_sizes={i: EVAL_SIZE for i in ids},
                             localization="masks", masks=masks)
    return metadata, root, dict(zip(ids, _cam_like_maps(MAPS, seed=3)))


def test_evaluator_pxap(benchmark, mask_split):
    metadata, root, maps = mask_split

    def evaluate():
        evaluator = SplitEvaluator(metadata, cam_curve_interval=0.001, mask_root=root)
        for image_id, scoremap in maps.items():
            evaluator.add(image_id, scoremap)
        return evaluator.result()

    benchmark.pedantic(evaluate, rounds=5, warmup_rounds=1, iterations=1)


# ---- training ------------------------------------------------------------------------------------

STEP_SIZE = dict(backbone="resnet10_half", image_size=64, batch_size=8, classes=10)


def _trainer(method: str, uda: str) -> tuple[Trainer, torch.Tensor, torch.Tensor, TrainingProgress]:
    torch.manual_seed(0)
    config = resolve_config(dict(dataset="bench", data_root="-", out="-", method=method, uda=uda,
                                 backbone=STEP_SIZE["backbone"], pretrained="none", image_size=STEP_SIZE["image_size"],
                                 batch_size=STEP_SIZE["batch_size"], epochs=2, device="cpu", source_samples=4,
                                 target_samples=4))
    model = build_model(config, STEP_SIZE["classes"])
    trainer = Trainer(model, config, torch.device("cpu"))
    trainer.start_epoch(1)
    model.train()
    images = torch.randn(STEP_SIZE["batch_size"], 3, STEP_SIZE["image_size"], STEP_SIZE["image_size"])
    labels = torch.arange(STEP_SIZE["batch_size"]) % STEP_SIZE["classes"]
    # Epoch 1 of 2 with start_epoch 0: DA-WSOL's losses are active (spec §5.7).
    return trainer, images, labels, TrainingProgress(epoch=1, batch_index=0, iterations_per_epoch=100, num_epochs=2)


@pytest.mark.parametrize("uda", ("none", *UDA_METHODS))
@pytest.mark.parametrize("method", available_methods())
def test_train_step(benchmark, method, uda):
    trainer, images, labels, progress = _trainer(method, uda)
    benchmark.pedantic(trainer.train_step, args=(images, labels, progress), **ROUNDS)


@pytest.mark.parametrize("engine", SEQUENTIAL_ENGINES)
def test_tsa_step(benchmark, engine):
    trainer, images, labels, progress = _trainer("cam", "mmd")
    trainer.model.assigner.sequential_engine = engine
    with torch.no_grad():
        out = trainer.model.method.training_step(images, labels, progress)
    features, source = out.features.detach(), out.source_features.detach()
    benchmark.pedantic(trainer.model.assigner.assign, args=(features, source, labels), **ROUNDS)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from wsolbench.datasets import synthetic

    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.generate(root, seed=0, num_classes=4, train_per_class=16, val_per_class=1, test_per_class=1,
                       source_classes=0)
    return root


def test_data_loading(benchmark, generated):
    from torch.utils.data import DataLoader

    from wsolbench.datasets.images import WSOLImageDataset, train_transform
    from wsolbench.datasets.metadata import read_split

    dataset = WSOLImageDataset(read_split(generated / "metadata", "SyntheticBoxes", "train"), generated / "images",
                               train_transform(128))

    def one_pass():
        for _ in DataLoader(dataset, batch_size=16, shuffle=False, num_workers=0):
            pass

    benchmark.pedantic(one_pass, rounds=5, warmup_rounds=1, iterations=1)


@pytest.fixture(scope="module")
def one_map(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    split = root / "metadata" / "bench" / "test"
    split.mkdir(parents=True)
    (split / "image_ids.txt").write_text("a.jpg\n")
    (split / "class_labels.txt").write_text("a.jpg,0\n")
    (split / "image_sizes.txt").write_text("a.jpg,224,224\n")
    (split / "localization.txt").write_text("a.jpg,20,20,120,120\n")
    maps = root / "maps"
    maps.mkdir()
    np.save(maps / "a.jpg.npy", _cam_like_maps(1)[0])
    return root


def test_evaluate_start(benchmark, one_map):
    argv = [sys.executable, "-m", "wsolbench", "evaluate", "--metadata-root", str(one_map / "metadata"),
            "--dataset", "bench", "--split", "test", "--scoremap-root", str(one_map / "maps"), "--json"]

    # A user's steady state: bytecode cached (the warm-up round writes it where a shell's
    # PYTHONDONTWRITEBYTECODE would not) and the AOT kernels built (the suite's first use builds them).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def run():
        subprocess.run(argv, check=True, capture_output=True, env=env)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)


def test_calibration_last(benchmark):
    benchmark.pedantic(_calibration_workload, **CALIBRATION_ROUNDS)
