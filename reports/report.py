"""Render the report from the store: one self-contained HTML page (figures inline, no network) and
the same tables as CSV beside it.

    summary = render_report("results/wsolbench.duckdb", "results/report")

Reads the DuckDB store (wsolbench.store) and nothing else: no run folder, no image file, no
Optuna storage. What the page holds, section by section:
  - the paper's Tables 1-4, each paper row beside the store's runs of the same method, UDA loss,
    variant, dataset and backbone (benchmark datasets only), metric by metric, with the
    difference; the store's benchmark runs that no paper row matches; the embedded default's
    runs in a section of their own, never beside a paper figure;
  - every figure as mean ± sample std over seeds with n, and each DA-WSOL setting against its
    base method, the difference marked where it exceeds the seeds' spread (SPREAD_RULE);
  - timings in the shape of Table 4, with the ratio to the same device's CAM (spec §7);
  - the λ1/λ2 study: its trials, history and best pair, and that pair's test figures;
  - pictures (paper Fig. 4), per-threshold box accuracy and PR curves, training curves;
  - provenance of every run and of the report.
Every part the store lacks (no study, no timings, one run, a mask-only dataset, a schema-1 store
without curves and pictures) is named in the page instead of drawn. The page's date is the render
time, or SOURCE_DATE_EPOCH when set (the reproducible-builds convention), so the same store renders
the same bytes.
"""
from __future__ import annotations

import base64
import csv
import datetime
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any, Iterable

from wsolbench import __version__, atomic
from wsolbench.errors import WsolbenchError
from wsolbench.reports import figures
from wsolbench.store import (BENCHMARK_DATASETS, METRICS, SCHEMA_VERSION, TIMING_METRICS, comparison_rows_of,
                             open_store, store_version)

REPORT_FILE = "index.html"
# Spec §7 and the paper's Table 4 (CAM, OpenImages, ResNet50, RTX 3090): DA-WSOL's training cost as
# a ratio to CAM's on the same machine, with MMD and with DANN (test ≈ 1.0 for both).
PAPER_MMD_TRAIN_RATIO, PAPER_DANN_TRAIN_RATIO = 1.82, 1.40
SPREAD_RULE = ("a DA-WSOL vs base difference is marked when both settings have at least two seeds and |difference| "
               "exceeds the sum of their sample standard deviations")
# The metrics each kind of dataset reports, in display order.
BOX_METRICS = ("top1_cls", "top1_loc", "gt_known_loc", "maxboxacc", "maxboxacc_v2", "maxboxacc_v2_iou30",
               "maxboxacc_v2_iou50", "maxboxacc_v2_iou70")
MASK_METRICS = ("top1_cls", "pxap", "piou")
UDA_NAMES = {"none": "—", "mmd": "MMD", "dann": "DANN"}
# Rows follow the paper's tables: CAM, HaS, ACoL, SPG, ADL, CutMix, then any other method by name.
PAPER_METHOD_ORDER = ("cam", "has", "acol", "spg", "adl", "cutmix")
UDA_ORDER = ("none", "mmd", "dann")


def method_key(method: str | None, uda: str | None = None) -> tuple:
    """Sort key: the paper's method order, then without / with MMD / with DANN."""
    method, uda = method or "", uda or "none"
    return (PAPER_METHOD_ORDER.index(method) if method in PAPER_METHOD_ORDER else len(PAPER_METHOD_ORDER), method,
            UDA_ORDER.index(uda) if uda in UDA_ORDER else len(UDA_ORDER), uda)


@dataclass
class ReportSummary:
    out: Path
    runs: int
    sections_absent: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        absent = f"; absent: {', '.join(self.sections_absent)}" if self.sections_absent else ""
        return f"wrote {self.out / REPORT_FILE} ({self.runs} runs, {self.seconds:.1f} s){absent}"


# ---- reading the store ---------------------------------------------------------------------------

def _tables(con: Any) -> set[str]:
    return {name for (name,) in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}


def _rows(con: Any, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    cursor = con.execute(sql, list(params))
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, values)) for values in cursor.fetchall()]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _lambda(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"


def _mean_std(row: dict[str, Any], digits: int = 2) -> str:
    """mean ± std (n), or the single value with n = 1."""
    text = _fmt(row["mean"], digits)
    if row["n"] > 1 and row["std"] is not None:
        text += f" ± {_fmt(row['std'], digits)}"
    return f"{text} (n={row['n']})"


def run_label(run: dict[str, Any]) -> str:
    """A run's short name: method, UDA loss, ablation variant, λ pair for DA-WSOL, seed."""
    label = run["method"] or "?"
    if run["uda"] and run["uda"] != "none":
        label += f" + {UDA_NAMES.get(run['uda'], run['uda'])}"
        if run["variant"]:
            label += f" [{run['variant']}]"
        label += f" (λ {_lambda(run['lambda1'])}/{_lambda(run['lambda2'])})"
    return f"{label} s{run['seed']}"


def _data_uri(data: bytes, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _setting_label(group: dict[str, Any]) -> str:
    label = group["method"]
    if group["uda"] != "none":
        label += f" + {UDA_NAMES.get(group['uda'], group['uda'])}"
        if group["variant"]:
            label += f" [{group['variant']}]"
    return label


def _code_provenance() -> dict[str, Any]:
    """The commit of the code rendering the report (as a run records its own), and the versions
    of what renders it."""
    from wsolbench.runfolder import source_version  # the run folders' own record of the code

    version = source_version() or {}
    commit, dirty = version.get("commit"), version.get("dirty")
    versions = {"wsolbench": __version__, "python": platform.python_version()}
    for name in ("duckdb", "matplotlib", "jinja2", "pandas"):
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = None
    return {"commit": commit, "dirty": dirty, "versions": versions, "platform": platform.platform()}


def _render_time() -> datetime.datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
        except ValueError:
            raise WsolbenchError(f"SOURCE_DATE_EPOCH={epoch!r}: expected whole seconds since 1970") from None
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


# ---- the sections ------------------------------------------------------------------------------

def _settings(con: Any, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting_id: its runs, recipe, profile and the figures (metric -> comparison row)."""
    settings: dict[str, dict[str, Any]] = {}
    for rid, run in sorted(runs.items(), key=lambda item: (item[1]["dataset"] or "",
                                                            *method_key(item[1]["method"], item[1]["uda"]),
                                                            item[1]["folder"])):
        setting = settings.setdefault(run["setting_id"], {
            "setting_id": run["setting_id"], "dataset_kind": run["dataset_kind"], "dataset": run["dataset"],
            "backbone": run["backbone"], "method": run["method"], "uda": run["uda"], "variant": run["variant"],
            "profile": run["profile"], "recipe": run["recipe"], "lambda1": run["lambda1"], "lambda2": run["lambda2"],
            "epochs": run["epochs"], "runs": [], "figures": {}, "timings": {}})
        setting["runs"].append(run)
    for row in comparison_rows_of(con):
        setting = settings.get(row["setting_id"])
        if setting is None:
            continue
        if row["metric"] in TIMING_METRICS:
            setting["timings"].setdefault(row["device"], {})[row["metric"]] = row
        else:
            setting["figures"][row["metric"]] = row
    for setting in settings.values():
        setting["label"] = _setting_label(setting)
        setting["seeds"] = sorted(run["seed"] for run in setting["runs"])
    return settings


def _paper_tables(con: Any, settings: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Paper Tables 1-4 with, per paper row, every benchmark setting that matches it; and the
    benchmark settings no paper row matches."""
    paper = _rows(con, "SELECT * FROM paper ORDER BY paper_table, rowid")
    matched: set[str] = set()
    tables: dict[int, dict[str, Any]] = {}
    for figure in paper:
        table = tables.setdefault(figure["paper_table"], {"number": figure["paper_table"], "rows": []})
        key = (figure["method"], figure["uda"], figure["variant"], figure["dataset"], figure["backbone"])
        ours = [s for s in settings.values() if s["dataset_kind"] == "benchmark"
                and (s["method"], s["uda"], s["variant"], s["dataset"], s["backbone"]) == key]
        line = {"row": figure["row_label"], "column": figure["column_label"], "dataset": figure["dataset"],
                "backbone": figure["backbone"], "metric": METRICS.get(figure["metric"], figure["metric"]),
                "metric_key": figure["metric"], "paper": figure["value_text"], "note": figure["note"], "ours": []}
        for setting in ours:
            if figure["metric"] in TIMING_METRICS:
                for device, timing in sorted(setting["timings"].items()):
                    row = timing.get(figure["metric"])
                    if row is None:
                        continue
                    ratio = row["ratio_to_cam"]
                    paper_ratio = row["paper_ratio_to_cam"]
                    line["ours"].append({"setting": setting, "value": f"{_mean_std(row)} on {device}",
                                         "difference": (f"ratio to CAM {_fmt(ratio)}x vs paper {_fmt(paper_ratio)}x"
                                                        if ratio is not None else "no same-device CAM run")})
                matched.add(setting["setting_id"])
            elif figure["metric"] in setting["figures"]:
                row = setting["figures"][figure["metric"]]
                line["ours"].append({"setting": setting, "value": _mean_std(row),
                                     "difference": f"{row['mean'] - figure['value']:+.2f}"})
                matched.add(setting["setting_id"])
        table["rows"].append(line)
    unmatched = [s for s in settings.values() if s["dataset_kind"] != "embedded" and s["setting_id"] not in matched]
    return [tables[number] for number in sorted(tables)], unmatched


def _metric_columns(settings: Iterable[dict[str, Any]]) -> list[str]:
    present = {metric for s in settings for metric in s["figures"]}
    return [m for m in (*BOX_METRICS, *MASK_METRICS[1:]) if m in present]


def _versus_base(settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each DA-WSOL setting against the base setting of its method on the same dataset, backbone,
    profile and epochs: per metric, the difference of means and whether it exceeds the seeds'
    spread. One block (a table) per dataset and backbone, a row per DA-WSOL setting."""
    blocks: dict[tuple, dict[str, Any]] = {}
    for setting in settings.values():
        if setting["uda"] == "none":
            continue
        bases = [s for s in settings.values() if s["uda"] == "none" and s["method"] == setting["method"]
                 and s["dataset"] == setting["dataset"] and s["backbone"] == setting["backbone"]
                 and s["profile"] == setting["profile"] and s["epochs"] == setting["epochs"]]
        if not bases:
            continue
        base = bases[0]
        block = blocks.setdefault((setting["dataset_kind"], setting["dataset"], setting["backbone"]), {
            "dataset": setting["dataset"], "backbone": setting["backbone"],
            "embedded": setting["dataset_kind"] == "embedded", "rows": [], "metrics": []})
        cells = {}
        for metric in _metric_columns([setting, base]):
            ours, theirs = setting["figures"].get(metric), base["figures"].get(metric)
            if ours is None or theirs is None:
                continue
            difference = ours["mean"] - theirs["mean"]
            if ours["n"] >= 2 and theirs["n"] >= 2:
                spread = (ours["std"] or 0.0) + (theirs["std"] or 0.0)
                verdict = "exceeds" if abs(difference) > spread else "within"
            else:
                spread, verdict = None, "one seed"
            cells[metric] = {"difference": difference, "spread": spread, "verdict": verdict,
                             "n": (ours["n"], theirs["n"])}
            if metric not in block["metrics"]:
                block["metrics"].append(metric)
        block["rows"].append({"setting": setting, "base": base, "cells": cells})
    for block in blocks.values():
        order = [m for m in (*BOX_METRICS, *MASK_METRICS[1:]) if m in block["metrics"]]
        block["metrics"] = order
        block["rows"].sort(key=lambda row: (*method_key(row["setting"]["method"], row["setting"]["uda"]),
                                            row["setting"]["variant"],
                                            row["setting"]["lambda1"] or 0, row["setting"]["lambda2"] or 0))
    return list(blocks.values())


def _timings(settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, backbone, device): Table 4's shape, a row per method and UDA loss."""
    blocks: dict[tuple, dict[str, Any]] = {}
    for setting in settings.values():
        for device, timing in setting["timings"].items():
            block = blocks.setdefault((setting["dataset"], setting["backbone"], device), {
                "dataset": setting["dataset"], "backbone": setting["backbone"], "device": device,
                "embedded": setting["dataset_kind"] == "embedded", "rows": []})
            train, test = timing.get("train_ms_per_image"), timing.get("test_ms_per_image")
            block["rows"].append({
                "setting": setting, "method": setting["method"], "uda": setting["uda"],
                "train": train["mean"] if train else None, "test": test["mean"] if test else None,
                "train_text": _mean_std(train) if train else "–", "test_text": _mean_std(test) if test else "–",
                "train_ratio": train["ratio_to_cam"] if train else None,
                "test_ratio": test["ratio_to_cam"] if test else None,
                "paper_train_ratio": train["paper_ratio_to_cam"] if train else None,
                "paper_test_ratio": test["paper_ratio_to_cam"] if test else None})
    out = []
    for block in blocks.values():
        block["rows"].sort(key=lambda r: (*method_key(r["method"], r["uda"]), r["setting"]["variant"]))
        # The chart: one bar per method and UDA loss, of its full-method setting with the most seeds
        # (the matrix's cell rather than, say, the study's best pair); the table has them all.
        chart: dict[tuple[str, str], dict[str, Any]] = {}
        for r in block["rows"]:
            if not r["setting"]["variant"]:
                key = (r["method"], r["uda"])
                if key not in chart or len(r["setting"]["runs"]) > len(chart[key]["setting"]["runs"]):
                    chart[key] = r
        chart_rows = list(chart.values())
        block["chart"] = _data_uri(figures.timing_chart(chart_rows, block["device"]), "image/png")
        out.append(block)
    return out


def _study(con: Any, runs: dict[str, dict[str, Any]], tables: set[str]) -> list[dict[str, Any]]:
    if "optuna_trials" not in tables:
        return []
    trials = _rows(con, "SELECT * FROM optuna_trials ORDER BY study, trial_number")
    studies: dict[str, list[dict[str, Any]]] = {}
    for trial in trials:
        studies.setdefault(trial["study"], []).append(trial)
    out = []
    for name, rows in studies.items():
        attrs = [json.loads(t["user_attrs"] or "{}") for t in rows]
        # `objective` is the val metric `wsolbench tune` records on each trial.
        metric = next((a["objective"] for a in attrs if a.get("objective")), None) or "val figure"
        complete = [t for t in rows if t["state"] == "COMPLETE" and t["value"] is not None]
        best = max(complete, key=lambda t: t["value"]) if complete else None
        tested = []
        if best is not None:
            for run in runs.values():
                if (run["lambda1"] is not None and run["lambda2"] is not None
                        and math.isclose(run["lambda1"], best["lambda1"], rel_tol=1e-12)
                        and math.isclose(run["lambda2"], best["lambda2"], rel_tol=1e-12)):
                    tested.append(run)
        chart = figures.study_charts(rows, metric)
        out.append({"name": name, "trials": rows, "best": best, "tested": tested, "metric": metric,
                    "chart": _data_uri(chart, "image/png"),
                    "states": {state: sum(t["state"] == state for t in rows) for state in
                               sorted({t["state"] for t in rows})}})
    return out


def _pictures(con: Any, runs: dict[str, dict[str, Any]], tables: set[str]) -> list[dict[str, Any]]:
    """Per (dataset, split): the fixed images as columns, a row per run (paper Fig. 4)."""
    if not {"sample_images", "sample_maps"} <= tables:
        return []
    images = _rows(con, "SELECT * FROM sample_images ORDER BY dataset, split, class_label, image_id")
    maps = {(m["run_id"], m["split"], m["image_id"]): m for m in _rows(con, "SELECT * FROM sample_maps")}
    blocks = []
    for (dataset, split) in dict.fromkeys((i["dataset"], i["split"]) for i in images):
        columns = [i for i in images if i["dataset"] == dataset and i["split"] == split]
        dataset_runs = sorted((r for r in runs.values() if r["dataset"] == dataset and r["test_split"] == split),
                              key=lambda r: (*method_key(r["method"], r["uda"]), r["variant"], r["seed"], r["folder"]))
        header = [{"image_id": i["image_id"], "class_label": i["class_label"],
                   "src": _data_uri(figures.overlay_jpeg(i, None, None, None), "image/jpeg")} for i in columns]
        rows = []
        for run in dataset_runs:
            cells = []
            for image in columns:
                sample = maps.get((run["run_id"], split, image["image_id"]))
                if sample is None:
                    cells.append(None)
                    continue
                box = json.loads(sample["predicted_box"]) if sample["predicted_box"] else None
                cells.append({"src": _data_uri(figures.overlay_jpeg(image, sample["map_png"], box, sample["threshold"]),
                                               "image/jpeg"),
                              "predicted_class": sample["predicted_class"], "iou": sample["predicted_iou"],
                              "threshold": sample["threshold"], "right_class": sample["predicted_class"] ==
                              image["class_label"]})
            if any(cells):
                rows.append({"run": run, "cells": cells})
        blocks.append({"dataset": dataset, "split": split, "header": header, "rows": rows,
                       "masks": any(i["gt_mask_png"] is not None for i in columns)})
    return blocks


def _curves(con: Any, runs: dict[str, dict[str, Any]], tables: set[str]) -> list[dict[str, Any]]:
    if "curves" not in tables:
        return []
    rows = _rows(con, "SELECT * FROM curves ORDER BY run_id, curve, iou")
    by_dataset: dict[str, dict[str, Any]] = {}
    for row in rows:
        run = runs.get(row["run_id"])
        if run is None:
            continue
        entry = by_dataset.setdefault(run["dataset"], {"box": {}, "pr": {}})
        thresholds, values = json.loads(row["thresholds"]), json.loads(row["values"])
        if row["kind"] == "boxes" and row["curve"] == "box_acc_v2":
            entry["box"].setdefault(row["run_id"], {})[row["iou"]] = (thresholds, values)
        elif row["kind"] == "masks" and row["curve"] in ("precision", "recall"):
            entry["pr"].setdefault(row["run_id"], {})[row["curve"]] = values
    out = []
    for dataset, entry in sorted(by_dataset.items()):
        order = sorted(set(entry["box"]) | set(entry["pr"]),
                       key=lambda rid: (*method_key(runs[rid]["method"], runs[rid]["uda"]), run_label(runs[rid])))
        charts = []
        if entry["box"]:
            charts.append(_data_uri(figures.box_curve_chart(
                [(run_label(runs[rid]), entry["box"][rid]) for rid in order if rid in entry["box"]], dataset),
                "image/png"))
        pr = [(run_label(runs[rid]), entry["pr"][rid].get("recall", []), entry["pr"][rid].get("precision", []))
              for rid in order if rid in entry["pr"]]
        if pr:
            charts.append(_data_uri(figures.pr_curve_chart(pr, dataset), "image/png"))
        out.append({"dataset": dataset, "charts": charts})
    return out


def _training(con: Any, runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    history = _rows(con, "SELECT run_id, phase, epoch, key, value FROM history ORDER BY run_id, phase, epoch")
    per_run: dict[str, dict[str, dict[str, list]]] = {}
    for row in history:
        per_run.setdefault(row["run_id"], {}).setdefault(row["phase"], {}).setdefault(row["key"], []).append(
            (row["epoch"], row["value"]))
    blocks: dict[str, list] = {}
    for rid, run in sorted(runs.items(), key=lambda item: (*method_key(item[1]["method"], item[1]["uda"]),
                                                            run_label(item[1]))):
        phases = per_run.get(rid, {})
        if not phases:
            continue
        metric = "pxap" if "pxap" in phases.get("val", {}) else "maxboxacc_v2"
        blocks.setdefault(run["dataset"], []).append(
            (run_label(run), phases.get("train", {}), METRICS.get(metric, metric), phases.get("val", {}).get(metric, [])))
    return [{"dataset": dataset, "chart": _data_uri(figures.training_chart(items), "image/png")}
            for dataset, items in sorted(blocks.items())]


def _benchmark_history(con: Any, tables: set[str]) -> dict[str, Any] | None:
    """The timing gate's recorded runs (`wsolbench bench --store`), per machine: a chart across
    runs and the latest run's ratios beside the one before."""
    if "benchmark_results" not in tables:
        return None
    rows = _rows(con, "SELECT * FROM benchmark_results WHERE ratio IS NOT NULL ORDER BY machine, run_at, benchmark")
    if not rows:
        return None
    machines = []
    for name in dict.fromkeys(r["machine"] for r in rows):
        mine = [r for r in rows if r["machine"] == name]
        runs = list(dict.fromkeys((r["run_at"], r["commit"]) for r in mine))
        series: dict[str, list[tuple[str, float]]] = {}
        for r in mine:
            label = f"{r['commit'][:8]}{'+' if r['dirty'] else ''} {r['run_at']:%m-%d %H:%M}"
            series.setdefault(r["benchmark"], []).append((label, r["ratio"]))
        latest, previous = runs[-1], runs[-2] if len(runs) > 1 else None
        table = []
        for benchmark in sorted(series):
            now = next((r for r in mine if (r["run_at"], r["commit"]) == latest and r["benchmark"] == benchmark), None)
            before = next((r for r in mine if previous and (r["run_at"], r["commit"]) == previous
                           and r["benchmark"] == benchmark), None)
            if now is not None:
                table.append({"benchmark": benchmark, "median_ms": now["median_s"] * 1000, "ratio": now["ratio"],
                              "previous": before["ratio"] if before else None,
                              "factor": now["ratio"] / before["ratio"] if before else None,
                              "baseline": now["baseline_ratio"]})
        machines.append({"machine": name, "runs": len(runs), "latest": latest, "table": table,
                         "chart": _data_uri(figures.benchmark_history_chart(series), "image/png")})
    return {"machines": machines}


# ---- CSV ---------------------------------------------------------------------------------------

def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in columns})
    return out.getvalue()


def _csv_files(settings, paper_tables, timings, studies, runs) -> dict[str, str]:
    setting_rows = []
    for s in settings.values():
        for metric, row in s["figures"].items():
            setting_rows.append({"dataset_kind": s["dataset_kind"], "dataset": s["dataset"], "backbone": s["backbone"],
                                 "method": s["method"], "uda": s["uda"], "variant": s["variant"],
                                 "profile": s["profile"], "recipe": s["recipe"], "lambda1": s["lambda1"],
                                 "lambda2": s["lambda2"], "setting_id": s["setting_id"], "metric": metric,
                                 "n": row["n"], "seeds": " ".join(map(str, row["seeds"])), "mean": row["mean"],
                                 "std": row["std"], "paper": row["paper"], "paper_table": row["paper_table"]})
    paper_rows = []
    for table in paper_tables:
        for line in table["rows"]:
            base = {"paper_table": table["number"], "row": line["row"], "column": line["column"],
                    "dataset": line["dataset"], "backbone": line["backbone"], "metric": line["metric_key"],
                    "paper": line["paper"]}
            if not line["ours"]:
                paper_rows.append(base)
            for ours in line["ours"]:
                paper_rows.append({**base, "setting_id": ours["setting"]["setting_id"],
                                   "profile": ours["setting"]["profile"], "recipe": ours["setting"]["recipe"],
                                   "ours": ours["value"], "difference": ours["difference"]})
    timing_rows = [{"dataset": b["dataset"], "backbone": b["backbone"], "device": b["device"], "method": r["method"],
                    "uda": r["uda"], "variant": r["setting"]["variant"], "train_ms_per_image": r["train"],
                    "test_ms_per_image": r["test"], "train_ratio_to_cam": r["train_ratio"],
                    "test_ratio_to_cam": r["test_ratio"], "paper_train_ratio_to_cam": r["paper_train_ratio"],
                    "paper_test_ratio_to_cam": r["paper_test_ratio"]} for b in timings for r in b["rows"]]
    trial_rows = [t for s in studies for t in s["trials"]]
    run_rows = list(runs.values())
    return {
        "settings.csv": _csv(setting_rows, ["dataset_kind", "dataset", "backbone", "method", "uda", "variant",
                                            "profile", "recipe", "lambda1", "lambda2", "setting_id", "metric", "n",
                                            "seeds", "mean", "std", "paper", "paper_table"]),
        "paper_tables.csv": _csv(paper_rows, ["paper_table", "row", "column", "dataset", "backbone", "metric", "paper",
                                              "setting_id", "profile", "recipe", "ours", "difference"]),
        "timings.csv": _csv(timing_rows, ["dataset", "backbone", "device", "method", "uda", "variant",
                                          "train_ms_per_image", "test_ms_per_image", "train_ratio_to_cam",
                                          "test_ratio_to_cam", "paper_train_ratio_to_cam", "paper_test_ratio_to_cam"]),
        "trials.csv": _csv(trial_rows, ["study", "trial_number", "state", "lambda1", "lambda2", "value", "run_id",
                                        "datetime_start", "datetime_complete"]),
        "runs.csv": _csv(run_rows, ["run_id", "dataset_kind", "dataset", "method", "uda", "variant", "backbone",
                                    "profile", "seed", "lambda1", "lambda2", "epochs", "recipe", "folder",
                                    "code_commit", "code_dirty", "wsolbench_version", "torch_version",
                                    "torchvision_version", "python_version", "device", "finished_at", "command"]),
    }


# ---- rendering ---------------------------------------------------------------------------------

def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("wsolbench.reports", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["lam"] = _lambda
    env.globals["METRICS"] = METRICS
    env.globals["UDA_NAMES"] = UDA_NAMES
    return env.get_template("report.html.j2")


def render_report(store_path: str | os.PathLike, out_dir: str | os.PathLike,
                  log=lambda line: print(line, file=sys.stderr, flush=True)) -> ReportSummary:
    """Render the store into `out_dir` (index.html and the CSV tables), replacing the folder
    atomically: a failed render leaves the previous report as it was."""
    started = time.perf_counter()
    store_path, out_dir = Path(store_path), Path(out_dir)
    with open_store(store_path, read_only=True) as con:
        tables = _tables(con)
        version = store_version(con)
        runs = {}
        for run in _rows(con, "SELECT * FROM runs ORDER BY folder"):
            config = json.loads(run["config"] or "{}") if run["config"] else {}
            run["recipe"] = config.get("recipe") if isinstance(config, dict) else None
            run["environment"] = json.loads(run["environment"] or "{}")
            run["label"] = run_label(run)
            runs[run["run_id"]] = run
        log(f"report: {len(runs)} runs in {store_path} (schema {version})")
        settings = _settings(con, runs)
        paper_tables, unmatched = _paper_tables(con, settings)
        embedded = [s for s in settings.values() if s["dataset_kind"] == "embedded"]
        versus = _versus_base(settings)
        log("report: timings and the λ study")
        timings = _timings(settings)
        studies = _study(con, runs, tables)
        log("report: pictures and curves")
        pictures = _pictures(con, runs, tables)
        curves = _curves(con, runs, tables)
        training = _training(con, runs)
        benchmarks = _benchmark_history(con, tables)
    absent = []
    if not runs:
        absent.append("runs (the store holds no run: `wsolbench collect RUN_ROOT` first)")
    if not any(s["dataset_kind"] == "benchmark" for s in settings.values()):
        absent.append("runs on the paper's datasets (CUB, ILSVRC, OpenImages): no paper row has a counterpart")
    if not timings:
        absent.append("timings (no run recorded ms/image)")
    if not studies:
        absent.append("a λ1/λ2 study (no Optuna trials in the store: `wsolbench collect --optuna-storage URL`)")
    if version < 2:
        absent.append(f"pictures and per-threshold curves (a schema-{version} store: collect again with this "
                      f"wsolbench to add them)")
    elif runs and not pictures:
        absent.append("pictures (no run's score maps were collected: `wsolbench collect --pictures N`)")
    elif runs and not curves:
        absent.append("per-threshold curves (no curves.json was collected)")
    if benchmarks is None:
        absent.append("the timing gate's history (no `wsolbench bench --store` run in the store)")
    if runs and not any(s["seeds"] and len(s["seeds"]) > 1 for s in settings.values()):
        absent.append("seed spread (every setting has one seed: train more with `-S 'train.seeds=[0,1,2]'`)")
    rendered_at = _render_time()
    context = {
        "store": str(store_path), "schema": version, "schema_known": SCHEMA_VERSION, "rendered_at": rendered_at,
        "code": _code_provenance(),
        "runs": sorted(runs.values(), key=lambda r: (r["dataset"] or "", *method_key(r["method"], r["uda"]), r["label"])),
        "settings": settings, "paper_tables": paper_tables, "unmatched": unmatched, "embedded": embedded,
        "embedded_metrics": _metric_columns(embedded), "unmatched_metrics": _metric_columns(unmatched),
        "versus": versus, "spread_rule": SPREAD_RULE, "timings": timings, "studies": studies,
        "pictures": pictures, "curves": curves, "training": training, "absent": absent, "benchmarks": benchmarks,
        "paper_ratios": (PAPER_MMD_TRAIN_RATIO, PAPER_DANN_TRAIN_RATIO), "benchmark_datasets": BENCHMARK_DATASETS}
    html = _template().render(**context)
    files = _csv_files(settings, paper_tables, timings, studies, runs)
    with atomic.directory(out_dir, replace=True) as staging:
        (staging / REPORT_FILE).write_text(html, encoding="utf-8")
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
    return ReportSummary(out_dir, len(runs), absent, time.perf_counter() - started)
