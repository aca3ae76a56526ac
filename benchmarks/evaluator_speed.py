"""Evaluator speed and memory, measured side by side in one run.

    python benchmarks/evaluator_speed.py speed  [--images 1000] [--interval 0.01] [--baseline-images N] [--repeat 3]
    python benchmarks/evaluator_speed.py memory [--images 50000]

`speed` writes score maps for the real CUB val split (1,000 images) into a temporary folder,
then times, whole process against whole process:
  baseline   this file's `baseline` command: the per-threshold evaluator written from the spec's
             definition (spec §2.2-2.4) the way the protocol's reference code runs it: for every
             map and every threshold, cv2.threshold + cv2.findContours + boundingRect, then one IoU
             matrix per map; one process, one thread.
  wsolbench  `wsolbench evaluate --json` (the fast engine, both cores).
It checks that both print the same MaxBoxAccV2 and per-IoU numbers and prints the ratio: the two
sides run in turn --repeat times (A B A B ...), and the medians and the pairwise ratios are reported.
Maps (--maps): "golden" cycles through the six shapes of the protocol's golden cases
(../shared/wsol-golden/scoremaps.py: blob, several blobs, ring, blob with noise, zeros, max 0.6),
the maps the reference evaluator's cost was quoted on; "cam" are smooth CAM-like maps (a few
blobs and a little noise at 14x14 or 28x28, upsampled as the protocol does), on which OpenCV's
contour search is cheapest and the per-threshold definition is hardest to beat.

`memory` evaluates 50,000 maps of the real ILSVRC test split (several boxes per image) and prints
the peak resident memory of the `wsolbench evaluate` process. To keep the disk use small the maps
are symbolic links to a pool of 64 distinct map files; every map is still read and evaluated.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def cam_like_map(rng: np.random.Generator, feature_size: int = 28) -> np.ndarray:
    """A map shaped like a real CAM: a few smooth blobs plus noise at feature resolution, then the
    protocol's post-processing (bicubic upsampling to 224, min-max)."""
    yy, xx = np.mgrid[0:feature_size, 0:feature_size].astype(np.float64)
    cam = np.zeros((feature_size, feature_size))
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, feature_size, 2)
        sy, sx = rng.uniform(1.5, feature_size / 3, 2)
        cam += rng.uniform(0.3, 1.0) * np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)
    cam += rng.uniform(0, 0.3) * rng.random((feature_size, feature_size))
    cam = cv2.resize(cam, (224, 224), interpolation=cv2.INTER_CUBIC)
    cam -= cam.min()
    return cam / cam.max()


def golden_generator():
    shared = Path(os.environ.get("WSOLBENCH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    source = shared / "wsol-golden" / "scoremaps.py"
    if not source.exists():
        sys.exit(f"{source}: not found (the golden maps need ../shared; use --maps cam)")
    import importlib.util
    spec = importlib.util.spec_from_file_location("golden_scoremaps", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.scoremap


def write_maps(image_ids: list[str], root: Path, seed: int, kind: str = "cam", pool: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    golden = golden_generator() if kind == "golden" else None
    sources: list[Path] = []
    for n, image_id in enumerate(image_ids):
        path = root / f"{image_id}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        if pool is not None and n >= pool:
            os.symlink(sources[n % pool], path)
            continue
        scoremap = golden(n, seed) if golden else cam_like_map(rng, int(rng.choice([14, 28])))
        np.save(path, scoremap)
        sources.append(path)


# ---- the definition-following baseline (spec §2.2-2.4, per threshold) -------------------------

def baseline(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wsolbench.datasets.metadata import read_split

    meta = read_split(args.metadata_root, args.dataset, args.split)
    ids = meta.image_ids[: args.images] if args.images else meta.image_ids
    thresholds = np.arange(0, 1, args.interval)
    iou_thresholds = (30, 50, 70)
    correct = np.zeros((len(iou_thresholds), len(thresholds)))
    for image_id in ids:
        scoremap = np.load(Path(args.scoremap_root) / f"{image_id}.npy")
        width, height = meta.image_sizes[image_id]
        gt = np.array([[int(x0 * 224 / width), int(y0 * 224 / height), int(x1 * 224 / width), int(y1 * 224 / height)]
                       for x0, y0, x1, y1 in meta.boxes[image_id]])
        quantized = (scoremap * 255).astype(np.uint8)
        boxes_per_threshold = []
        for tau in thresholds:
            _, binary = cv2.threshold(quantized, int(tau * np.max(quantized)), 255, cv2.THRESH_BINARY)
            contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
            if len(contours) == 0:
                boxes_per_threshold.append(np.zeros((1, 4), dtype=np.int64))
                continue
            boxes = []
            for contour in contours:
                x, y, w, h = cv2.boundingRect(contour)
                boxes.append([x, y, min(x + w, 223), min(y + h, 223)])
            boxes_per_threshold.append(np.array(boxes))
        counts = [len(b) for b in boxes_per_threshold]
        all_boxes = np.concatenate(boxes_per_threshold)
        a, b = all_boxes[:, None, :], gt[None, :, :]
        inter = (np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
                 * np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1))
        area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
        area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
        ious = inter / (area_a + area_b - inter)
        start = 0
        for k, count in enumerate(counts):
            best = ious[start:start + count].max()
            start += count
            for i, delta in enumerate(iou_thresholds):
                correct[i, k] += best >= delta / 100
    per_iou = {str(d): float((correct[i] * 100 / len(ids)).max()) for i, d in enumerate(iou_thresholds)}
    print(json.dumps({"MaxBoxAccV2": float(np.mean(list(per_iou.values()))), "per_iou": per_iou}))


# ---- runs ------------------------------------------------------------------------------------

def timed(command: list[str]) -> tuple[float, dict, int]:
    """Wall time, the printed JSON and the peak RSS (KiB) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, json.loads(done.stdout), max(peak, before)


def wsolbench_command(maps: Path, dataset: str, split: str, interval: float, metadata_root: Path) -> list[str]:
    return [sys.executable, "-m", "wsolbench", "evaluate", "--scoremap-root", str(maps), "--metadata-root",
            str(metadata_root), "--dataset", dataset, "--split", split, "--cam-curve-interval", str(interval),
            "--json", "--quiet"]


def subset_metadata(root: Path, dataset: str, split: str, count: int) -> Path:
    """A metadata folder holding the first `count` images of a packaged split."""
    from wsolbench.datasets.metadata import read_split

    meta = read_split(None, dataset, split)
    ids = meta.image_ids[:count]
    folder = root / "metadata" / dataset / split
    folder.mkdir(parents=True)
    (folder / "image_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    (folder / "class_labels.txt").write_text("".join(f"{i},{meta.class_labels[i]}\n" for i in ids))
    (folder / "image_sizes.txt").write_text("".join(f"{i},{meta.image_sizes[i][0]},{meta.image_sizes[i][1]}\n" for i in ids))
    (folder / "localization.txt").write_text("".join(f"{i},{','.join(map(str, b))}\n" for i in ids for b in meta.boxes[i]))
    return root / "metadata"


def speed(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="wsolbench-bench-") as tmp:
        tmp = Path(tmp)
        metadata_root = subset_metadata(tmp, "CUB", "val", args.images)
        maps = tmp / "maps"
        from wsolbench.datasets.metadata import read_split
        ids = read_split(metadata_root, "CUB", "val").image_ids
        write_maps(ids, maps, seed=0, kind=args.maps)
        # Warm the kernel cache (a first process builds the AOT kernels) so that both sides are steady-state processes.
        subprocess.run(wsolbench_command(maps, "CUB", "val", args.interval, metadata_root), capture_output=True, check=True)
        baseline_images = args.baseline_images or len(ids)
        base_root = metadata_root if baseline_images == len(ids) else subset_metadata(tmp / "b", "CUB", "val", baseline_images)
        print(f"{len(ids)} CUB-sized {args.maps} maps (baseline on {baseline_images}), interval {args.interval}, "
              f"{os.cpu_count()} CPUs", flush=True)
        fast_time, fast, _ = timed(wsolbench_command(maps, "CUB", "val", args.interval, metadata_root))
        # The two sides in turn (A B A B ...), so that a drift of the machine's speed hits both.
        fast_times, base_times = [], []
        for _ in range(args.repeat):
            elapsed, fast_sub, _ = timed(wsolbench_command(maps, "CUB", "val", args.interval, base_root))
            fast_times.append(elapsed)
            elapsed, base, _ = timed([sys.executable, __file__, "baseline", "--scoremap-root", str(maps),
                                      "--metadata-root", str(base_root), "--dataset", "CUB", "--split", "val",
                                      "--interval", str(args.interval)])
            base_times.append(elapsed)
        fast_sub_time, base_time = statistics.median(fast_times), statistics.median(base_times)
        ratios = sorted(b / f for b, f in zip(base_times, fast_times))
        agree = base["per_iou"] == fast_sub["per_iou"] and base["MaxBoxAccV2"] == fast_sub["MaxBoxAccV2"]
        runs = f"median of {args.repeat} runs" if args.repeat > 1 else "one run"
        print(f"baseline  (definition, per threshold): {base_time:8.2f} s  {base_time / baseline_images * 1e3:8.2f} ms/map  {base['per_iou']}  ({runs})")
        print(f"wsolbench (fast engine, same maps):    {fast_sub_time:8.2f} s  {fast_sub_time / baseline_images * 1e3:8.2f} ms/map  {fast_sub['per_iou']}  ({runs})")
        print(f"wsolbench (all {len(ids)} maps):            {fast_time:8.2f} s  {fast_time / len(ids) * 1e3:8.2f} ms/map")
        print(f"agree: {agree}")
        print(f"ratio (whole process vs whole process, same maps): {statistics.median(ratios):.1f}x"
              + (f" (min {ratios[0]:.1f}x, max {ratios[-1]:.1f}x over {len(ratios)} pairs)" if len(ratios) > 1 else ""))
        if not agree:
            sys.exit(1)


def memory(args: argparse.Namespace) -> None:
    from wsolbench.datasets.metadata import read_split

    with tempfile.TemporaryDirectory(prefix="wsolbench-mem-") as tmp:
        tmp = Path(tmp)
        metadata_root = subset_metadata(tmp, "ILSVRC", "test", args.images)
        ids = read_split(metadata_root, "ILSVRC", "test").image_ids
        maps = tmp / "maps"
        write_maps(ids, maps, seed=1, kind=args.maps, pool=64)
        elapsed, result, peak = timed(wsolbench_command(maps, "ILSVRC", "test", args.interval, metadata_root))
        print(f"{len(ids)} ILSVRC test maps, interval {args.interval}: {elapsed:.1f} s "
              f"({elapsed / len(ids) * 1e3:.2f} ms/map), peak RSS {peak / 1024:.0f} MiB, MaxBoxAccV2 {result['MaxBoxAccV2']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--images", type=int, default=1000)
    s.add_argument("--baseline-images", type=int, default=None, help="run the baseline on the first N maps only")
    s.add_argument("--interval", type=float, default=0.01)
    s.add_argument("--maps", choices=("golden", "cam"), default="golden")
    s.add_argument("--repeat", type=int, default=3, help="timed runs of each side, in turn; the medians are reported")
    s.set_defaults(run=speed)
    m = sub.add_parser("memory")
    m.add_argument("--images", type=int, default=50000)
    m.add_argument("--interval", type=float, default=0.001)
    m.add_argument("--maps", choices=("golden", "cam"), default="golden")
    m.set_defaults(run=memory)
    b = sub.add_parser("baseline")
    b.add_argument("--scoremap-root", required=True)
    b.add_argument("--metadata-root", required=True)
    b.add_argument("--dataset", required=True)
    b.add_argument("--split", required=True)
    b.add_argument("--interval", type=float, default=0.01)
    b.add_argument("--images", type=int, default=None)
    b.set_defaults(run=baseline)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
