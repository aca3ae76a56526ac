"""How far a torchrun run's metrics are from one process's, with the same global batch (issue 13).

    python benchmarks/distributed_metrics.py [--processes 2] [--seeds 0 1 2] [--udas none mmd]

Trains each method x uda x seed twice through the real command, `wsolbench train --config
params.yaml:config` (the embedded default's fine-tuning settings, so `dvc repro pretrain` must have
run), once as one process and once under `torchrun --standalone --nproc_per_node N`, and prints per
cell the test figures of both, their per-seed differences, and the train ms/image. On the CPU the
processes share the machine's cores (OMP_NUM_THREADS=1 each under torchrun), so the times say
nothing about GPU scaling. Run folders go under --out (kept, so a rerun reuses finished runs).

`--control` adds a third run per cell: one process with OMP_NUM_THREADS=1 (the single process
otherwise uses the machine's threads). It does the same arithmetic in another summation order and
nothing else, so its distance from the default run is what float rounding alone does to a whole
training run: the floor against which the N-process differences are read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

FIGURES = ("gt_known_loc", "maxboxacc_v2", "top1_loc", "top1_cls")


def train(out: Path, processes: int, method: str, uda: str, seed: int, params: str,
          threads: int | None = None) -> dict:
    if not (out / "metrics.json").exists():
        command = ["-m", "wsolbench", "train", "--quiet", "--config", params, "--method", method, "--uda", uda,
                   "--seed", str(seed), "--out", str(out)]
        if processes > 1:
            command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *command]
        env = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        subprocess.run([sys.executable, *command], check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["cam"])
    parser.add_argument("--udas", nargs="+", default=["none", "mmd"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--params", default="params.yaml:config")
    parser.add_argument("--out", type=Path, default=Path("runs/distributed-metrics"))
    parser.add_argument("--control", action="store_true",
                        help="also one process on one thread: the float-rounding floor (see above)")
    args = parser.parse_args()
    control_columns = " | 1 process, 1 thread | per-seed difference (1 thread - 1)" if args.control else ""
    print(f"| cell | figure | 1 process (n={len(args.seeds)}) | {args.processes} processes | "
          f"per-seed difference ({args.processes} - 1){control_columns} |")
    print("|---|---|---|---|---|" + ("---|---|" if args.control else ""))
    timing = []
    for method in args.methods:
        for uda in args.udas:
            runs = {n: [train(args.out / f"{n}p" / f"{method}-{uda}-{seed}", n, method, uda, seed, args.params)
                        for seed in args.seeds] for n in (1, args.processes)}
            if args.control:
                runs["1t"] = [train(args.out / "1p-1thread" / f"{method}-{uda}-{seed}", 1, method, uda, seed,
                                    args.params, threads=1) for seed in args.seeds]
            for figure in FIGURES:
                one = [m[figure] for m in runs[1]]
                many = [m[figure] for m in runs[args.processes]]
                differences = ", ".join(f"{b - a:+.1f}" for a, b in zip(one, many))
                row = f"| {method}+{uda} | {figure} | {mean_std(one)} | {mean_std(many)} | {differences} |"
                if args.control:
                    threaded = [m[figure] for m in runs["1t"]]
                    row += f" {mean_std(threaded)} | " + ", ".join(f"{b - a:+.1f}" for a, b in zip(one, threaded)) + " |"
                print(row)
            timing.append((f"{method}+{uda}", [m["train_ms_per_image"] for m in runs[1]],
                           [m["train_ms_per_image"] for m in runs[args.processes]]))
    print()
    print(f"| cell | train ms/image, 1 process | {args.processes} processes (sharing the same cores) |")
    print("|---|---|---|")
    for name, one, many in timing:
        print(f"| {name} | {statistics.median(one):.1f} | {statistics.median(many):.1f} |")


if __name__ == "__main__":
    main()
