"""The target sample assigner's two modes on the generated dataset, side by side in one run.

    python benchmarks/assigner_modes.py [--out runs/assigner-modes] [--seeds 0,1] [--uda mmd]

"sequential" is the reference (image i's anchor updates are seen by image i+1); "batched"
clusters a whole batch at once from the anchors at batch start. For each seed this trains
CAM + DA-WSOL with both modes on SyntheticBoxes (the synthetic recipe), and prints the test
metrics, their differences, and the train ms/image of each mode, so the speed-up can be weighed
against how much the batched approximation moves the numbers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from wsolbench.config import resolve_config
from wsolbench.datasets import synthetic
from wsolbench.experiment import train_and_evaluate
from wsolbench.runfolder import RunFolder

FIGURES = ("top1_cls", "top1_loc", "gt_known_loc", "maxboxacc", "maxboxacc_v2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/assigner-modes"))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--uda", default="mmd")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    data = args.out / "data"
    if not (data / "README.txt").exists():
        synthetic.generate(data, seed=0)
    results: dict[tuple[int, str], dict] = {}
    for seed in map(int, args.seeds.split(",")):
        for mode in ("sequential", "batched"):
            run = args.out / f"seed{seed}-{mode}"
            folder = RunFolder(run)
            if folder.is_complete():
                results[seed, mode] = folder.read_metrics()
                continue
            config = resolve_config(dict(dataset="SyntheticBoxes", data_root=str(data / "images"),
                                         metadata_root=str(data / "metadata"), method="cam", uda=args.uda,
                                         assigner_mode=mode, seed=seed, epochs=args.epochs, out=str(run)))
            results[seed, mode] = train_and_evaluate(config, resume=run.exists(), log=lambda line: print(line, flush=True))
    print(f"\nCAM + DA-WSOL ({args.uda}) on SyntheticBoxes, test split, percent")
    print(f"{'seed':<5}{'mode':<11}" + "".join(f"{f:>14}" for f in FIGURES) + f"{'train ms/img':>14}")
    for (seed, mode), m in sorted(results.items()):
        print(f"{seed:<5}{mode:<11}" + "".join(f"{m[f]:>14.2f}" for f in FIGURES) + f"{m['train_ms_per_image']:>14.1f}")
    for seed in sorted({s for s, _ in results}):
        a, b = results[seed, "sequential"], results[seed, "batched"]
        print(f"{seed:<5}{'difference':<11}" + "".join(f"{b[f] - a[f]:>+14.2f}" for f in FIGURES)
              + f"{b['train_ms_per_image'] / a['train_ms_per_image']:>13.2f}x")


if __name__ == "__main__":
    main()
