"""Expected GPU hours of a full reproduction, worked out from measured ms/image figures.

    python benchmarks/gpu_hours.py [--log benchmarks/logs/gpu_table4_h100_2026-11-26_run1.log]

Reads the per-method fp32 train ms/image of the H100 log (benchmarks/gpu_table4.sh: ResNet50,
224 px, 28x28 maps, batch 32, the sequential assigner for DA-WSOL) and multiplies by the images a
run trains on (epochs x the train split, spec §6.2 recipes, split sizes from the embedded
metadata; ILSVRC train is 1,281,167 images) and the images it scores (val every eval_frequency
epochs and test once, at the log's test ms/image, which on that machine is CPU-bound map
post-processing, not a GPU figure). Only ResNet50 has been measured on a GPU: the VGG16 and
InceptionV3 rows print "not measured" rather than a guess.

Then the wall time of the whole reproduction (the 18 runs of each ResNet50 setting: 6 methods x
{none, MMD, DANN}, one seed) on 1 GPU and on 8, the 8 taking one run each at a time (DVC's
experiment queue, `dvc queue start -j 8`), longest runs first; and what torchrun would add.
"""
from __future__ import annotations

import argparse
import gzip
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LOG = ROOT / "benchmarks" / "logs" / "gpu_table4_h100_2026-11-26_run1.log"
METHODS = ("cam", "has", "acol", "spg", "adl", "cutmix")
UDAS = ("mmd", "dann")
ILSVRC_TRAIN_IMAGES = 1_281_167  # ImageNet-1k train; its metadata is written by `prepare ilsvrc-train`
# (epochs, eval_frequency) of the ResNet50 recipes (spec §6.2 table; harness/config.py recipes).
RESNET50_SCHEDULE = {"CUB": (50, 5), "ILSVRC": (10, 1), "OpenImages": (10, 1)}
# Rows of the log's tables: "name train /bare test" for a method, "name train /bare /base test
# test/base" for a method + DA-WSOL; the first table is fp32.
ROW_TEST_COLUMN = {4: 3, 6: 4}


def split_size(dataset: str, split: str) -> int:
    if dataset == "ILSVRC" and split == "train":
        return ILSVRC_TRAIN_IMAGES
    path = ROOT / "datasets" / "data" / dataset / split / "image_ids.txt.gz"
    with gzip.open(path, "rt") as lines:
        return sum(1 for line in lines if line.strip())


def fp32_figures(log: Path) -> dict[str, tuple[float, float]]:
    """name -> (train ms/img, test ms/img) from the log's first (fp32) occurrence of each row."""
    wanted = set(METHODS) | {f"{m}+{u}" for m in METHODS for u in UDAS}
    figures: dict[str, tuple[float, float]] = {}
    for line in log.read_text().splitlines():
        tokens = line.split()
        if tokens and tokens[0] in wanted and len(tokens) in ROW_TEST_COLUMN:
            figures.setdefault(tokens[0], (float(tokens[1]), float(tokens[ROW_TEST_COLUMN[len(tokens)]])))
    missing = [m for m in METHODS if m not in figures or any(f"{m}+{u}" not in figures for u in UDAS)]
    if missing:
        raise SystemExit(f"{log}: no fp32 row for {', '.join(missing)}")
    return figures


def hours(dataset: str, train_ms: float, test_ms: float) -> float:
    epochs, eval_frequency = RESNET50_SCHEDULE[dataset]
    trained = epochs * split_size(dataset, "train")
    scored = (epochs // eval_frequency) * split_size(dataset, "val") + split_size(dataset, "test")
    return (trained * train_ms + scored * test_ms) / 1000 / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG)
    args = parser.parse_args()
    figures = fp32_figures(args.log)
    print("| setting | 6 methods, one seed: GPU h | + DA-WSOL (MMD): GPU h | the 12 runs: GPU h | CAM / CAM + MMD: GPU h |")
    print("|---|---|---|---|---|")
    for dataset in RESNET50_SCHEDULE:
        base = sum(hours(dataset, *figures[m]) for m in METHODS)
        adapted = sum(hours(dataset, *figures[f"{m}+mmd"]) for m in METHODS)
        cam, cam_mmd = hours(dataset, *figures["cam"]), hours(dataset, *figures["cam+mmd"])
        print(f"| {dataset} ResNet50 | {base:.1f} | {adapted:.1f} | {base + adapted:.1f} | {cam:.2f} / {cam_mmd:.2f} |")
    for dataset in RESNET50_SCHEDULE:
        for backbone in ("InceptionV3", "VGG16"):
            print(f"| {dataset} {backbone} | not measured | not measured | not measured | not measured |")
    runs = {(dataset, name): hours(dataset, *figures[name]) for dataset in RESNET50_SCHEDULE
            for name in (*METHODS, *(f"{m}+{u}" for m in METHODS for u in UDAS))}
    longest = max(runs, key=runs.get)
    print()
    print("| the 54 ResNet50 runs (3 datasets x 6 methods x {none, MMD, DANN}, one seed) | wall time |")
    print("|---|---|")
    print(f"| 1 GPU, one run after another | {sum(runs.values()):.0f} h |")
    print(f"| 8 GPUs, one run per GPU at a time (dvc queue start -j 8), longest first | "
          f"{makespan(list(runs.values()), 8):.0f} h |")
    print(f"| the longest run alone ({longest[0]} {longest[1]}), which 8 queue workers cannot shorten | "
          f"{runs[longest]:.0f} h |")
    # torchrun: each run on all 8 GPUs. Not measured: it assumes the method's step and the scoring
    # divide by 8 (no communication cost), while DA-WSOL's assigner does not divide at all, since
    # every rank clusters the whole global batch (methods/dawsol/target_sample_assigner.py).
    spread = 0.0
    for (dataset, name) in runs:
        base = name.split("+")[0]
        train_ms, test_ms = figures[name]
        assigner_ms = train_ms - figures[base][0] if "+" in name else 0.0
        spread += hours(dataset, figures[base][0] / 8 + assigner_ms, test_ms / 8)
    print(f"| 8 GPUs, every run on all 8 by torchrun, if the step divided by 8 and the assigner not at all "
          f"(a model, not measured) | {spread:.0f} h |")


def makespan(durations: list[float], workers: int) -> float:
    """The wall time of `durations` on `workers` workers, each taking the longest job left when it
    frees up (longest processing time first)."""
    loads = [0.0] * workers
    for duration in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += duration
    return max(loads)


if __name__ == "__main__":
    main()
