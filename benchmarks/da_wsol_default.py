"""DA-WSOL on the embedded default, measured with seeds: CAM, CAM + MMD at several lambda pairs, and
paper Table 3's ablations — what benchmarks/RESULTS.md reports, with what DA-WSOL did per epoch.

    python benchmarks/da_wsol_default.py [--out runs/da-wsol-default] [--seeds 0,1,2] [--variants all]

Every variant fine-tunes the backbone pretrained on the source task with the synthetic recipe
(wsolbench.config); only the named settings differ. The lambda pairs besides the CUB one are the
other official recipes' (spec §6.2: ILSVRC ResNet50 0.3/3, CUB InceptionV3 1.4/4, ILSVRC
InceptionV3 0.1/0.3). Finished runs are reused and killed ones resumed, so the script can be
stopped and run again. It prints, per variant, the test figures as mean ± std over the seeds
(and each seed's), and the DA-WSOL terms logged in history.json averaged over the epochs where
DA-WSOL was active.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from wsolbench.config import resolve_config
from wsolbench.experiment import train_and_evaluate
from wsolbench.pretrain import embedded_default
from wsolbench.runfolder import RunFolder

# name -> the settings that differ from the synthetic recipe (CAM, uda none).
VARIANTS: dict[str, dict] = {
    "cam": {},
    "cam+mmd 0.3/2 (CUB)": dict(uda="mmd", lambda1=0.3, lambda2=2.0),
    "cam+mmd 0.3/3 (ILSVRC)": dict(uda="mmd", lambda1=0.3, lambda2=3.0),
    "cam+mmd 1.4/4 (CUB Inc.)": dict(uda="mmd", lambda1=1.4, lambda2=4.0),
    "cam+mmd 0.1/0.3 (ILSVRC Inc.)": dict(uda="mmd", lambda1=0.1, lambda2=0.3),
    "no L_d (L_u only)": dict(uda="mmd", lambda1=0.3, lambda2=2.0, use_domain_loss=False),
    "no L_u": dict(uda="mmd", lambda1=0.3, lambda2=2.0, use_universum_loss=False),
    "no TSA": dict(uda="mmd", lambda1=0.3, lambda2=2.0, use_assigner=False),
}
FIGURES = ("top1_cls", "gt_known_loc", "maxboxacc_v2", "top1_loc")
DA_LOGS = ("L_c", "lambda1_L_d", "lambda2_L_u", "valid_share", "universum_pixels", "fake_target_pixels",
           "real_target_pixels", "background_anchor_norm")


def folder_name(variant: str, seed: int) -> str:
    return "".join(c if c.isalnum() else "-" for c in variant).strip("-") + f"-s{seed}"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/da-wsol-default"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="all", help="comma-separated variant names, or all")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    log = lambda line: print(line, flush=True)  # noqa: E731
    locations, weights = embedded_default(args.out, device=args.device, log=log)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    metrics: dict[tuple[str, int], dict] = {}
    histories: dict[tuple[str, int], list[dict]] = {}
    for name in names:
        for seed in seeds:
            folder = RunFolder(args.out / folder_name(name, seed))
            if not folder.is_complete():
                config = resolve_config({**locations, "dataset": "SyntheticBoxes", "method": "cam", "seed": seed,
                                         "pretrained": str(weights), "device": args.device,
                                         "out": str(folder.path), **VARIANTS[name]})
                train_and_evaluate(config, resume=not folder.is_empty(), log=log)
            metrics[name, seed] = folder.read_metrics()
            histories[name, seed] = folder.read_history()["train"]

    print(f"\nSyntheticBoxes test split, percent; mean ± std over seeds {args.seeds}")
    print("| variant | " + " | ".join(FIGURES) + " | per seed (gt_known_loc) | train ms/img |")
    print("|---" * (len(FIGURES) + 3) + "|")
    for name in names:
        rows = [metrics[name, seed] for seed in seeds]
        cells = [mean_std([r[f] for r in rows]) for f in FIGURES]
        per_seed = " / ".join(f"{r['gt_known_loc']:.1f}" for r in rows)
        ms = statistics.median(r["train_ms_per_image"] for r in rows)
        print(f"| {name} | " + " | ".join(cells) + f" | {per_seed} | {ms:.1f} |")

    print("\nDA-WSOL per epoch (history.json), mean over the active epochs and the seeds")
    print("| variant | " + " | ".join(DA_LOGS) + " |")
    print("|---" * (len(DA_LOGS) + 1) + "|")
    for name in names:
        active = [epoch for seed in seeds for epoch in histories[name, seed] if "L_d" in epoch]
        if not active:
            continue
        print(f"| {name} | " + " | ".join(f"{statistics.mean(e[k] for e in active):.3f}" for k in DA_LOGS) + " |")
    print("\ntotal loss (L_c + lambda1 L_d + lambda2 L_u) by epoch, mean over seeds:")
    for name in names:
        epochs = len(histories[name, seeds[0]])
        line = " ".join(f"{statistics.mean(histories[name, s][e]['loss'] for s in seeds):.3f}" for e in range(epochs))
        print(f"  {name:<32} {line}")


if __name__ == "__main__":
    main()
