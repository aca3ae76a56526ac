"""The store: every run folder's record, metrics, history and timings, Optuna's trials and the paper's
published figures, in one DuckDB file that the comparison (`wsolbench runs`) and the report read.

    summary = collect(["runs/"], "results/wsolbench.duckdb", optuna_storage="sqlite:///tune.db")
    rows = comparison_rows("results/wsolbench.duckdb", dataset="OpenImages")

Tables (schema version SCHEMA_VERSION; every value in the metric vocabulary of metrics.json):
  schema_version  version: the store's layout; a newer one than this code knows is refused
  runs            one row per run_id: the identity (JSON, and its main fields flattened), the
                  setting (identity without the seed: the runs that differ by seed only), command,
                  git commit and dirty flag, versions, device, folder, finish and collect times,
                  and `dataset_kind`: 'benchmark' (CUB, ILSVRC, OpenImages: the paper's datasets),
                  'embedded' (the generated SyntheticBoxes/SyntheticMasks) or 'other'. Only
                  'benchmark' runs are ever joined with the paper's figures.
  metrics         run_id, split, metric, value: the final figures of metrics.json
  history         run_id, phase ('train'/'val'), epoch (1-based), key, value: history.json, incl.
                  DA-WSOL's per-epoch logs (L_c, L_d, L_u, lambda1_L_d, ..., background_anchor_norm)
  timings         run_id, kind ('train'/'test'), measure ('end_to_end'), ms_per_image, device
  optuna_trials   study, trial_number, state, lambda1, lambda2, value, run_id, start/complete times
  paper           Tables 1-4 of the DA-WSOL paper, from data/paper_da_wsol_cvpr2022.csv
  curves          (schema 2) run_id, split, curve, iou, thresholds and values (JSON lists): the
                  test split's per-threshold curves of curves.json — box accuracy (box_acc_v2 at
                  IoU 30/50/70, box_acc_v1, gt_known_acc, top1_loc_acc) or, for masks, the
                  precision, recall and iou curves over the PR thresholds (iou column 0)
  sample_images   (schema 2) the fixed test images of each dataset, for the report's pictures:
  sample_maps     thumbnails and ground truth; each run's score map on them and its prediction
                  (wsolbench.samples says what exactly)
  benchmark_results (schema 2) the timing gate's runs (`wsolbench bench --store`), keyed by commit,
                  machine and time: each benchmark's median seconds and its ratio to calibration
Views:
  run_figures     each run's test-split metrics plus its end-to-end timings as metrics
                  (train_ms_per_image, test_ms_per_image, with the device they were measured on)
  paper_reference one paper figure per (method, uda, variant, dataset, backbone, metric): the
                  lowest-numbered table's (Table 4 repeats Table 2's baselines), with every table's
                  printed value in `printed` (they differ once: CutMix's OpenImages PxAP)
  comparison      run_figures joined with paper_reference, NULL where the paper has no figure
                  (always NULL for the embedded default: it is not the paper's data)

`variant` names a DA-WSOL ablation (paper Table 3: 'no_domain_loss', 'no_universum_loss',
'no_assigner', joined by '+'), or the paper's two-stage 'Ours*'; '' is the full method.

How the file is written. DuckDB lets one process open a file read-write, or several read-only,
never both; a second process gets a one-line WsolbenchError naming the file. collect updates the
store in place, one transaction per run (delete its rows, insert the new ones), rather than
building a copy and renaming it over the store: a rename would not see another process's lock
(a reader or writer holding the old file would silently lose or keep stale data), and copying a
growing store on every collect costs more than the few rows that change. DuckDB's write-ahead log
makes each committed transaction durable and rolls an interrupted one back on the next open, so a
killed collect leaves every run either as before or fully replaced. The store is checkpointed
before it is closed, so the .duckdb file alone (no .wal beside it) holds everything.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import re
import shlex
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from wsolbench import __version__
from wsolbench.config import run_id as identity_hash
from wsolbench.errors import InputError, WsolbenchError
from wsolbench.runfolder import RunFolder
from wsolbench.samples import DEFAULT_SAMPLE_COUNT

SCHEMA_VERSION = 2

# The paper's datasets, by the metadata folder names wsolbench uses for them.
BENCHMARK_DATASETS = ("CUB", "ILSVRC", "OpenImages")
# The names datasets/synthetic.py gives the embedded default's datasets (not imported from there:
# that module pulls in OpenCV, and collect should start fast; a test checks the names agree).
EMBEDDED_DATASETS = ("SyntheticBoxes", "SyntheticMasks", "SyntheticSource")

# The metric vocabulary of metrics.json (experiment.figures_of) and the paper file, in report order,
# with display names. The per-IoU MaxBoxAccV2 values are `maxboxacc_v2_iou30` etc.
METRICS: dict[str, str] = {
    "top1_cls": "Top-1 Cls", "top1_loc": "Top-1 Loc", "gt_known_loc": "GT-known Loc", "maxboxacc": "MaxBoxAcc",
    "maxboxacc_v2": "MaxBoxAccV2", "maxboxacc_v2_iou30": "MaxBoxAccV2 IoU30",
    "maxboxacc_v2_iou50": "MaxBoxAccV2 IoU50", "maxboxacc_v2_iou70": "MaxBoxAccV2 IoU70",
    "pxap": "PxAP", "piou": "pIoU", "train_ms_per_image": "train ms/img", "test_ms_per_image": "test ms/img"}
TIMING_METRICS = ("train_ms_per_image", "test_ms_per_image")
PER_IOU_KEY = "maxboxacc_v2_per_iou"  # a dict {"30": ..., "50": ..., "70": ...} in metrics/history
# The DA-WSOL ablation switches (config fields) and their names in `variant`, in this order.
ABLATIONS = (("use_domain_loss", "no_domain_loss"), ("use_universum_loss", "no_universum_loss"),
             ("use_assigner", "no_assigner"))
PAPER_FILE = "paper_da_wsol_cvpr2022.csv"
PAPER_COLUMNS = ("table", "row", "column", "method", "uda", "variant", "dataset", "backbone", "metric", "value",
                 "note")

Warn = Callable[[str], None]

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL, written_by VARCHAR NOT NULL);
CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY,
    dataset_kind VARCHAR NOT NULL,      -- 'benchmark' | 'embedded' | 'other'
    dataset VARCHAR, method VARCHAR, uda VARCHAR, variant VARCHAR NOT NULL, backbone VARCHAR,
    profile VARCHAR, seed BIGINT, lambda1 DOUBLE, lambda2 DOUBLE, epochs INTEGER, batch_size INTEGER,
    lr DOUBLE, image_size INTEGER, large_feature_map BOOLEAN, precision VARCHAR, test_split VARCHAR,
    pretrained_sha256 VARCHAR,
    setting_id VARCHAR NOT NULL,        -- the identity without the seed, hashed as run_id is
    identity VARCHAR NOT NULL,          -- JSON text (VARCHAR: no dependency on DuckDB's json extension)
    config VARCHAR,                     -- JSON text: the resolved config
    command VARCHAR, code_commit VARCHAR, code_dirty BOOLEAN,
    environment VARCHAR,                -- JSON text: package versions, platform, device
    wsolbench_version VARCHAR, python_version VARCHAR, torch_version VARCHAR, torchvision_version VARCHAR,
    device VARCHAR,
    folder VARCHAR NOT NULL,
    finished_at TIMESTAMP,              -- UTC: metrics.json's modification time
    collected_at TIMESTAMP NOT NULL,    -- UTC
    fingerprint VARCHAR NOT NULL        -- sha256 of the folder path and the files read: unchanged -> not rewritten
);
CREATE TABLE metrics (run_id VARCHAR NOT NULL, split VARCHAR NOT NULL, metric VARCHAR NOT NULL, value DOUBLE,
                      PRIMARY KEY (run_id, split, metric));
CREATE TABLE history (run_id VARCHAR NOT NULL, phase VARCHAR NOT NULL, epoch INTEGER NOT NULL,
                      key VARCHAR NOT NULL, value DOUBLE, PRIMARY KEY (run_id, phase, epoch, key));
CREATE TABLE timings (run_id VARCHAR NOT NULL, kind VARCHAR NOT NULL, measure VARCHAR NOT NULL,
                      ms_per_image DOUBLE, device VARCHAR, PRIMARY KEY (run_id, kind, measure));
CREATE TABLE optuna_trials (
    study VARCHAR NOT NULL, trial_number INTEGER NOT NULL, state VARCHAR, lambda1 DOUBLE, lambda2 DOUBLE,
    value DOUBLE, "values" VARCHAR, params VARCHAR, user_attrs VARCHAR, run_id VARCHAR,
    datetime_start TIMESTAMP, datetime_complete TIMESTAMP,  -- as Optuna records them (local time)
    storage VARCHAR, PRIMARY KEY (study, trial_number));
CREATE TABLE paper (
    paper_table INTEGER NOT NULL, row_label VARCHAR NOT NULL, column_label VARCHAR NOT NULL,
    method VARCHAR NOT NULL, uda VARCHAR NOT NULL, variant VARCHAR NOT NULL, dataset VARCHAR NOT NULL,
    backbone VARCHAR NOT NULL, metric VARCHAR NOT NULL, value DOUBLE NOT NULL,
    value_text VARCHAR NOT NULL,        -- the digits as printed
    note VARCHAR NOT NULL,
    PRIMARY KEY (paper_table, method, uda, variant, dataset, backbone, metric));
CREATE VIEW run_figures AS
    SELECT m.run_id, m.metric, m.value, NULL::VARCHAR AS device
    FROM metrics m JOIN runs r ON r.run_id = m.run_id AND m.split = r.test_split
    UNION ALL
    SELECT run_id, kind || '_ms_per_image' AS metric, ms_per_image AS value, device
    FROM timings WHERE measure = 'end_to_end';
CREATE VIEW paper_reference AS
    SELECT method, uda, variant, dataset, backbone, metric,
           arg_min(value, paper_table) AS value, min(paper_table) AS paper_table,
           string_agg('Table ' || paper_table || ': ' || value_text, '; ' ORDER BY paper_table) AS printed
    FROM paper GROUP BY method, uda, variant, dataset, backbone, metric;
CREATE VIEW comparison AS
    SELECT r.run_id, r.dataset_kind, r.dataset, r.method, r.uda, r.variant, r.backbone, r.profile, r.seed,
           r.setting_id, r.lambda1, r.lambda2, r.epochs, f.metric, f.value, f.device,
           p.value AS paper_value, p.paper_table, p.printed AS paper_printed
    FROM runs r JOIN run_figures f ON f.run_id = r.run_id
    LEFT JOIN paper_reference p
        ON r.dataset_kind = 'benchmark' AND p.method = r.method AND p.uda = r.uda AND p.variant = r.variant
           AND p.dataset = r.dataset AND p.backbone = r.backbone AND p.metric = f.metric;
"""


# Added in schema 2: created in a new store and added to a schema-1 store opened for writing.
_SCHEMA_2 = """
CREATE TABLE IF NOT EXISTS curves (run_id VARCHAR NOT NULL, split VARCHAR NOT NULL, kind VARCHAR NOT NULL, curve VARCHAR NOT NULL,
                     iou INTEGER NOT NULL, thresholds VARCHAR NOT NULL, "values" VARCHAR NOT NULL,  -- JSON lists
                     PRIMARY KEY (run_id, split, curve, iou));
CREATE TABLE IF NOT EXISTS sample_images (
    dataset VARCHAR NOT NULL, split VARCHAR NOT NULL, image_id VARCHAR NOT NULL, class_label INTEGER,
    width INTEGER, height INTEGER, eval_size INTEGER, localization VARCHAR,
    thumbnail_png BLOB NOT NULL, gt_boxes VARCHAR,   -- JSON [[x0, y0, x1, y1], ...] at the evaluation size (spec §1.4)
    gt_mask_png BLOB,                                -- masks: 1 / 0 / 255 (ignore) at the evaluation size
    PRIMARY KEY (dataset, split, image_id));
CREATE TABLE IF NOT EXISTS sample_maps (
    run_id VARCHAR NOT NULL, split VARCHAR NOT NULL, image_id VARCHAR NOT NULL, dataset VARCHAR NOT NULL,
    map_png BLOB NOT NULL, predicted_class INTEGER, threshold DOUBLE,
    predicted_box VARCHAR, predicted_iou DOUBLE,      -- boxes: JSON [x0, y0, x1, y1] at the evaluation size
    PRIMARY KEY (run_id, split, image_id));
CREATE TABLE IF NOT EXISTS benchmark_results (
    commit VARCHAR NOT NULL, dirty BOOLEAN, machine VARCHAR NOT NULL, run_at TIMESTAMP NOT NULL,  -- UTC
    benchmark VARCHAR NOT NULL, median_s DOUBLE NOT NULL,
    ratio DOUBLE, baseline_ratio DOUBLE,   -- to the run's calibration workload (NULL for the calibration)
    wsolbench_version VARCHAR,
    PRIMARY KEY (commit, machine, run_at, benchmark));
"""

RUN_TABLES = ("metrics", "history", "timings", "curves", "sample_maps", "runs")


def dataset_kind(dataset: str | None) -> str:
    """'benchmark' for the paper's datasets, 'embedded' for the generated ones, else 'other'."""
    if dataset in BENCHMARK_DATASETS:
        return "benchmark"
    return "embedded" if dataset in EMBEDDED_DATASETS else "other"


def variant_of(identity: dict[str, Any]) -> str:
    """The DA-WSOL ablation a run is ('' for the full method, and for a run without DA-WSOL)."""
    if identity.get("uda", "none") == "none":
        return ""
    return "+".join(name for field, name in ABLATIONS if identity.get(field) is False)


# ---- opening the store ---------------------------------------------------------------------------

def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@contextlib.contextmanager
def open_store(path: str | os.PathLike, read_only: bool = False) -> Iterator[Any]:
    """A DuckDB connection to the store at `path`, its schema checked (and created when the file
    is new and `read_only` is false); checkpointed and closed on exit."""
    import duckdb

    path = Path(path)
    if read_only and not path.is_file():
        raise WsolbenchError(f"{path}: no store there (create it with `wsolbench collect RUN_ROOT --store {path}`)")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as error:
        message = _one_line(error)
        if "lock" in message.lower():
            holder = re.search(r"\(PID (\d+)\)", message)
            by = f" (PID {holder.group(1)})" if holder else ""
            raise WsolbenchError(f"{path}: the store is open in another process{by}; DuckDB lets one process write "
                                 f"a store or several read it, never both: retry when that process is done") from None
        raise WsolbenchError(f"{path}: cannot open the store ({message})") from None
    except duckdb.Error as error:
        raise WsolbenchError(f"{path}: not a store duckdb {duckdb.__version__} can open ({_one_line(error)})") from None
    try:
        _check_schema(con, path, create=not read_only)
        yield con
        if not read_only:
            con.execute("CHECKPOINT")
    finally:
        con.close()


def _check_schema(con: Any, path: Path, create: bool) -> None:
    tables = {name for (name,) in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
    if "schema_version" not in tables:
        if tables:
            raise WsolbenchError(f"{path}: a DuckDB file, but not a wsolbench store (it has no schema_version table)")
        if not create:
            raise WsolbenchError(f"{path}: an empty DuckDB file, not a wsolbench store")
        with _transaction(con):
            con.execute(_SCHEMA)
            con.execute(_SCHEMA_2)
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, f"wsolbench {__version__}"])
            _load_paper(con)
        return
    version, written_by = con.execute(
        "SELECT version, written_by FROM schema_version ORDER BY version DESC LIMIT 1").fetchone()
    if version > SCHEMA_VERSION:
        raise WsolbenchError(f"{path}: written by a newer wsolbench ({written_by}, store schema {version}); this "
                             f"wsolbench {__version__} reads schema {SCHEMA_VERSION} and older: upgrade wsolbench, "
                             f"or collect into another store")
    if version < 2 and create:
        # Schema 1 -> 2 adds tables only. Its runs' fingerprints are cleared so that this collect
        # re-reads every run folder (its curves and pictures) instead of finding it unchanged.
        with _transaction(con):
            con.execute(_SCHEMA_2)
            con.execute("UPDATE runs SET fingerprint = ''")
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, f"wsolbench {__version__}"])
    elif create and "benchmark_results" not in tables:
        with _transaction(con):  # a schema-2 store written before the gate recorded benchmarks
            con.execute(_SCHEMA_2)


def store_version(con: Any) -> int:
    """The schema version of an open store (a read-only schema-1 store stays at 1)."""
    return int(con.execute("SELECT max(version) FROM schema_version").fetchone()[0])


@contextlib.contextmanager
def _transaction(con: Any) -> Iterator[None]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _insert(con: Any, table: str, rows: list[dict[str, Any]]) -> None:
    """Insert rows (dicts of column -> value) by column name, through one pandas frame: DuckDB
    scans it in one statement, where executemany costs a statement per row."""
    if not rows:
        return
    import pandas as pd

    frame = pd.DataFrame(rows)
    con.register("_incoming", frame)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _incoming")
    finally:
        con.unregister("_incoming")


# ---- the paper's figures -------------------------------------------------------------------------

def read_paper_figures() -> list[dict[str, str]]:
    """The rows of the package's transcription of the paper's Tables 1-4, as text."""
    text = resources.files("wsolbench").joinpath("data", PAPER_FILE).read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != PAPER_COLUMNS:
        raise WsolbenchError(f"{PAPER_FILE}: expected the columns {','.join(PAPER_COLUMNS)}")
    return list(reader)


def _load_paper(con: Any) -> None:
    """(Re)load the paper table from the package's file, so a corrected transcription reaches
    every store on its next collect."""
    con.execute("DELETE FROM paper")
    _insert(con, "paper", [{
        "paper_table": int(row["table"]), "row_label": row["row"], "column_label": row["column"],
        "method": row["method"], "uda": row["uda"], "variant": row["variant"], "dataset": row["dataset"],
        "backbone": row["backbone"], "metric": row["metric"], "value": float(row["value"]),
        "value_text": row["value"], "note": row["note"]} for row in read_paper_figures()])


# ---- reading run folders -------------------------------------------------------------------------

@dataclasses.dataclass
class CollectedRun:
    """What collect writes for one run folder: its `runs` row and its rows of the other tables."""

    run_id: str
    folder: Path
    finished_at: datetime.datetime
    fingerprint: str
    run: dict[str, Any]
    metrics: list[dict[str, Any]]
    history: list[dict[str, Any]]
    timings: list[dict[str, Any]]
    curves: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sample_images: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sample_maps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pictures_absent: str | None = None  # why the run has no pictures (its data folders moved, say)


@dataclasses.dataclass
class CollectSummary:
    store: Path
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    skipped: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    studies: int = 0
    trials: int = 0

    def line(self) -> str:
        text = (f"{self.store}: runs {self.added} added, {self.replaced} replaced, {self.unchanged} unchanged, "
                f"{len(self.skipped)} skipped")
        if self.studies:
            text += f"; {self.trials} Optuna trials from {self.studies} {'study' if self.studies == 1 else 'studies'}"
        return text


def find_run_folders(root: Path) -> Iterator[Path]:
    """Every folder under `root` (itself included) that holds a config.json, in sorted order; a run
    folder's own subfolders (score maps, checkpoints) are not searched."""
    for dirpath, dirnames, filenames in os.walk(root):
        if "config.json" in filenames:
            dirnames.clear()
            yield Path(dirpath)
        else:
            # Hidden folders are atomic writes in progress (wsolbench.atomic) or tool state.
            dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))


def _number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (booleans, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _figures(entry: dict[str, Any], keys: Iterable[str] | None = None) -> dict[str, float]:
    """The numeric figures of a metrics.json or history.json entry, the per-IoU dict flattened."""
    figures: dict[str, float] = {}
    for key, value in entry.items():
        if keys is not None and key not in keys and key != PER_IOU_KEY:
            continue
        if key == PER_IOU_KEY and isinstance(value, dict):
            for iou, accuracy in value.items():
                if _number(accuracy) is not None:
                    figures[f"maxboxacc_v2_iou{iou}"] = _number(accuracy)
        elif _number(value) is not None:
            figures[key] = _number(value)
    return figures


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).replace(tzinfo=None)


def _device_of(environment: dict[str, Any]) -> str | None:
    """The device timings were measured on: the GPU's name, or the CPU with its thread count."""
    if environment.get("gpu"):
        return str(environment["gpu"])
    device = environment.get("device")
    if device is None:
        return None
    threads = environment.get("cpu_threads")
    return f"{device} ({threads} threads)" if device == "cpu" and threads else str(device)


# The identity fields the runs table flattens, with the JSON types they may have (None: absent).
_IDENTITY_TYPES: dict[str, tuple[type, ...]] = {
    **{name: (str,) for name in ("dataset", "method", "uda", "backbone", "profile", "precision", "test_split",
                                 "pretrained_sha256")},
    **{name: (int,) for name in ("seed", "epochs", "batch_size", "image_size")},
    **{name: (int, float) for name in ("lambda1", "lambda2", "lr")},
    "large_feature_map": (bool,)}


def _curve_rows(rid: str, split: str, curves: dict[str, Any]) -> list[dict[str, Any]]:
    """curves.json as curves rows: one per (curve, IoU threshold); 0 for curves without one."""
    thresholds = json.dumps(curves.get("thresholds", []))
    rows = []
    for name, value in curves.items():
        if name in ("kind", "metric", "thresholds"):
            continue
        by_iou = value if isinstance(value, dict) else {"0": value} if isinstance(value, list) else {}
        for iou, values in by_iou.items():
            if isinstance(values, list) and str(iou).isdigit():
                rows.append({"run_id": rid, "split": split, "kind": str(curves.get("kind")), "curve": name,
                             "iou": int(iou), "thresholds": thresholds, "values": json.dumps(values)})
    return rows


def read_run(path: Path, collected_at: datetime.datetime, pictures: int = 0) -> CollectedRun:
    """A completed run folder's rows, with the pictures of `pictures` fixed test images (0: none).
    Raises WsolbenchError saying why a folder cannot be collected."""
    folder = RunFolder(path)
    if not folder.is_complete():
        # A `wsolbench tune` trial folder has none either: a trial trains and scores val only.
        raise WsolbenchError("partial: no metrics.json (still running, or killed)")
    files = [folder.config, folder.metrics] + [file for file in (folder.history, folder.curves) if file.exists()]
    digest = hashlib.sha256(f"schema {SCHEMA_VERSION} pictures {pictures} {path.resolve()}".encode())
    for file in files:
        digest.update(file.read_bytes())
    config = folder.read_config()
    metrics = folder.read_metrics()
    history = folder.read_history() if folder.history.exists() else {"train": [], "val": []}
    rid, identity = metrics.get("run_id"), metrics.get("identity")
    if not isinstance(rid, str) or not isinstance(identity, dict):
        raise InputError(folder.metrics, "no run_id or identity (written by an older wsolbench?)")
    for name, kinds in _IDENTITY_TYPES.items():
        # A value of another type would fail the insert half-way through collect: name it instead.
        value = identity.get(name)
        if value is not None and (isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds)):
            raise InputError(folder.metrics, f"identity.{name} is {value!r}, expected "
                                             f"{' or '.join(kind.__name__ for kind in kinds)}")
    if config.get("run_id") != rid:
        raise WsolbenchError(f"corrupt: config.json is run {config.get('run_id')} but metrics.json is run {rid}")
    for phase in ("train", "val"):
        entries = history.get(phase, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("epoch"), int)
                                                    for e in entries):
            raise InputError(folder.history, f"'{phase}' is not a list of per-epoch objects with an epoch number")
    environment = metrics.get("environment") if isinstance(metrics.get("environment"), dict) else {}
    code = metrics.get("code") if isinstance(metrics.get("code"), dict) else {}
    command = metrics.get("command")
    split = metrics.get("split") or identity.get("test_split")
    finished_at = _utc(folder.metrics.stat().st_mtime)
    device = _device_of(environment)
    run = {
        "run_id": rid, "dataset_kind": dataset_kind(identity.get("dataset")), "variant": variant_of(identity),
        **{name: identity.get(name) for name in (
            "dataset", "method", "uda", "backbone", "profile", "seed", "lambda1", "lambda2", "epochs", "batch_size",
            "lr", "image_size", "large_feature_map", "precision", "pretrained_sha256")},
        "test_split": split,
        # The runs of one setting differ by seed only: their figures are averaged by `wsolbench runs`.
        "setting_id": identity_hash({k: v for k, v in identity.items() if k != "seed"}),
        "identity": json.dumps(identity, sort_keys=True), "config": json.dumps(metrics.get("config"), sort_keys=True),
        "command": shlex.join(map(str, command)) if isinstance(command, list) else None,
        "code_commit": code.get("commit"), "code_dirty": code.get("dirty"),
        "environment": json.dumps(environment, sort_keys=True),
        **{f"{name}_version": environment.get(name) for name in ("wsolbench", "python", "torch", "torchvision")},
        "device": device, "folder": str(path), "finished_at": finished_at, "collected_at": collected_at,
        "fingerprint": digest.hexdigest()}
    metric_rows = [{"run_id": rid, "split": split, "metric": key, "value": value}
                   for key, value in _figures(metrics, [m for m in METRICS if m not in TIMING_METRICS]).items()]
    # Keyed by (phase, epoch, key): an epoch logged twice keeps its last entry, so the insert never
    # meets a duplicate key.
    history_rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    for phase in ("train", "val"):
        for entry in history.get(phase, []):
            for key, value in _figures({k: v for k, v in entry.items() if k != "epoch"}).items():
                history_rows[phase, entry["epoch"], key] = {"run_id": rid, "phase": phase, "epoch": entry["epoch"],
                                                            "key": key, "value": value}
    timing_rows = [{"run_id": rid, "kind": kind, "measure": "end_to_end", "ms_per_image": value, "device": device}
                   for kind in ("train", "test")
                   if (value := _number(metrics.get(f"{kind}_ms_per_image"))) is not None]
    curves = folder.read_curves() if folder.curves.exists() else None
    curve_rows = _curve_rows(rid, split, curves) if curves else []
    image_rows: list[dict[str, Any]] = []
    map_rows: list[dict[str, Any]] = []
    absent = None if pictures else "not asked for"
    if pictures:
        from wsolbench.samples import run_samples

        try:
            image_rows, map_rows = run_samples(folder, config.get("config", {}), curves, pictures)
        except (WsolbenchError, OSError) as error:
            # The run's figures are still collected; its pictures are named as absent.
            absent = _one_line(error)
        for row in map_rows:
            row.update(run_id=rid, dataset=identity.get("dataset"))
            digest.update(row["map_png"])
        for row in image_rows:
            digest.update(row["thumbnail_png"])
    digest.update(f"pictures absent: {absent}".encode())
    run["fingerprint"] = digest.hexdigest()
    return CollectedRun(rid, path, finished_at, digest.hexdigest(), run, metric_rows, list(history_rows.values()),
                        timing_rows, curve_rows, image_rows, map_rows, absent)


def _write_run(con: Any, run: CollectedRun) -> None:
    """Replace a run's rows: delete, then insert, in one transaction."""
    with _transaction(con):
        for table in RUN_TABLES:
            con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run.run_id])
        for row in run.sample_images:  # shared by the runs of a dataset: the latest read replaces it
            con.execute("DELETE FROM sample_images WHERE dataset = ? AND split = ? AND image_id = ?",
                        [row["dataset"], row["split"], row["image_id"]])
        _insert(con, "runs", [run.run])
        _insert(con, "metrics", run.metrics)
        _insert(con, "history", run.history)
        _insert(con, "timings", run.timings)
        _insert(con, "curves", run.curves)
        _insert(con, "sample_images", run.sample_images)
        _insert(con, "sample_maps", run.sample_maps)


# ---- Optuna --------------------------------------------------------------------------------------

def _optuna_storage(storage: str) -> Any:
    """An Optuna storage from a URL (sqlite:///tune.db, any RDB URL) or a journal file, as a path or
    `journal:PATH` (the spellings of `wsolbench tune --storage`). Files must exist: Optuna would
    create an empty storage for a mistyped name."""
    import warnings

    import optuna

    if "://" in storage:
        if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
            raise WsolbenchError(f"--optuna-storage {storage}: no such SQLite file")
        return storage
    path = Path(storage.removeprefix("journal:"))
    if not path.is_file():
        raise WsolbenchError(f"--optuna-storage {storage}: no such journal file (or pass a URL, e.g. sqlite:///tune.db)")
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna 3.x names it JournalFileStorage
        from optuna.storages import JournalFileStorage as JournalFileBackend
    with warnings.catch_warnings():  # the journal storage is "experimental" in some Optuna versions
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _trial_run_id(user_attrs: dict[str, Any]) -> str | None:
    """The run a trial trained: its `run_id` user attribute, or the run_id in the config.json of
    its `run_folder` attribute (what the tuner sets); None when neither is known."""
    if isinstance(user_attrs.get("run_id"), str):
        return user_attrs["run_id"]
    folder = user_attrs.get("run_folder")
    if isinstance(folder, str):
        try:
            rid = RunFolder(folder).read_config().get("run_id")
        except WsolbenchError:
            return None
        return rid if isinstance(rid, str) else None
    return None


def read_optuna_trials(storage: str) -> dict[str, list[dict[str, Any]]]:
    """Every study's trials in `storage`, as optuna_trials rows, by study name."""
    import optuna

    handle = _optuna_storage(storage)
    try:
        summaries = optuna.get_all_study_summaries(handle, include_best_trial=False)
        studies: dict[str, list[dict[str, Any]]] = {}
        for summary in summaries:
            study = optuna.load_study(study_name=summary.study_name, storage=handle)
            rows = []
            for trial in study.get_trials(deepcopy=False):
                values = trial.values
                rows.append({
                    "study": summary.study_name, "trial_number": trial.number, "state": trial.state.name,
                    "lambda1": _number(trial.params.get("lambda1")), "lambda2": _number(trial.params.get("lambda2")),
                    "value": _number(values[0]) if values is not None and len(values) == 1 else None,
                    "values": json.dumps(values), "params": json.dumps(trial.params, sort_keys=True, default=str),
                    "user_attrs": json.dumps(trial.user_attrs, sort_keys=True, default=str),
                    "run_id": _trial_run_id(trial.user_attrs), "datetime_start": trial.datetime_start,
                    "datetime_complete": trial.datetime_complete, "storage": storage})
            studies[summary.study_name] = rows
    except WsolbenchError:
        raise
    except Exception as error:  # SQLAlchemy, journal and Optuna errors alike mean an unreadable storage
        raise WsolbenchError(f"--optuna-storage {storage}: cannot read it ({type(error).__name__}: "
                             f"{_one_line(error)[:200]})") from None
    return studies


# ---- collect -------------------------------------------------------------------------------------

def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def collect(run_roots: Sequence[str | os.PathLike], store_path: str | os.PathLike,
            optuna_storage: str | None = None, warn: Warn = _stderr,
            pictures: int = DEFAULT_SAMPLE_COUNT) -> CollectSummary:
    """Collect the run folders under `run_roots` (and the trials of `optuna_storage`) into the store,
    with each run's pictures on `pictures` fixed test images (wsolbench.samples; 0: none).

    Idempotent: a run whose files are unchanged is not rewritten; a changed one (same run_id) has
    its rows replaced in one transaction. A partial or corrupt folder is named through `warn` (one
    line) and skipped. Nothing is written when a root is missing, the store is locked or newer, or
    the Optuna storage cannot be read."""
    roots = [Path(root) for root in run_roots]
    for root in roots:
        if not root.is_dir():
            raise WsolbenchError(f"{root}: no such folder of runs")
    store = Path(store_path)
    summary = CollectSummary(store)
    # Trials are read before the store is opened, so an unreadable storage writes nothing.
    studies = read_optuna_trials(optuna_storage) if optuna_storage else {}
    with open_store(store) as con:
        collected_at = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        found: dict[str, list[CollectedRun]] = {}
        seen: set[Path] = set()
        for root in roots:
            for path in find_run_folders(root):
                if path.resolve() in seen:  # one folder under two roots given
                    continue
                seen.add(path.resolve())
                try:
                    run = read_run(path, collected_at, pictures)
                except OSError as error:  # a file removed or unreadable while collect reads it
                    summary.skipped.append((path, f"corrupt: {error.filename}: {error.strerror}"))
                    continue
                except WsolbenchError as error:
                    reason = str(error) if str(error).startswith(("partial", "corrupt")) else f"corrupt: {error}"
                    summary.skipped.append((path, reason))
                    continue
                found.setdefault(run.run_id, []).append(run)
        # One row per run_id: two folders of one identity (a run trained twice) keep the one
        # finished last; the other is named.
        runs = []
        for rid, candidates in found.items():
            candidates.sort(key=lambda r: (r.finished_at, str(r.folder)))
            runs.append(candidates[-1])
            for other in candidates[:-1]:
                summary.skipped.append((other.folder, f"duplicate: run {rid} is also {candidates[-1].folder}, "
                                                      f"finished later (kept)"))
        for path, reason in summary.skipped:
            warn(f"skipped {path}: {reason}")
        for run in runs:
            if pictures and run.pictures_absent:
                warn(f"{run.folder}: collected without pictures ({run.pictures_absent})")
        stored = dict(con.execute("SELECT run_id, fingerprint FROM runs").fetchall())
        for run in sorted(runs, key=lambda r: str(r.folder)):
            if stored.get(run.run_id) == run.fingerprint:
                summary.unchanged += 1
                continue
            _write_run(con, run)
            if run.run_id in stored:
                summary.replaced += 1
            else:
                summary.added += 1
        with _transaction(con):
            _load_paper(con)
        for name, rows in studies.items():
            with _transaction(con):
                con.execute("DELETE FROM optuna_trials WHERE study = ?", [name])
                _insert(con, "optuna_trials", rows)
            summary.studies += 1
            summary.trials += len(rows)
    return summary


# ---- benchmarks (`wsolbench bench --store`) -------------------------------------------------------

def record_benchmarks(store_path: str | os.PathLike, rows: list[dict[str, Any]]) -> int:
    """Add one gate run's rows (wsolbench.bench.result_rows) to benchmark_results, in one transaction."""
    with open_store(store_path) as con, _transaction(con):
        _insert(con, "benchmark_results", rows)
    return len(rows)


# ---- the comparison (`wsolbench runs`) -----------------------------------------------------------

COMPARISON_COLUMNS = ("dataset_kind", "dataset", "backbone", "method", "uda", "variant", "setting_id", "profile",
                      "lambda1", "lambda2", "epochs", "device", "metric", "n", "seeds", "mean", "std", "paper",
                      "paper_table", "paper_printed", "ratio_to_cam", "paper_ratio_to_cam")

_COMPARISON_SQL = """
WITH groups AS (
    SELECT dataset_kind, dataset, backbone, method, uda, variant, setting_id,
           any_value(profile) AS profile, any_value(lambda1) AS lambda1, any_value(lambda2) AS lambda2,
           any_value(epochs) AS epochs, device, metric, count(*) AS n, list(seed ORDER BY seed) AS seeds,
           avg(value) AS mean, stddev_samp(value) AS std, any_value(paper_value) AS paper,
           any_value(paper_table) AS paper_table, any_value(paper_printed) AS paper_printed
    FROM comparison
    WHERE ($dataset IS NULL OR dataset = $dataset) AND ($method IS NULL OR method = $method)
      AND ($uda IS NULL OR uda = $uda)
    GROUP BY dataset_kind, dataset, backbone, method, uda, variant, setting_id, device, metric),
-- Spec §7: timings compare across machines only as ratios to the same machine's CAM baseline.
cam AS (
    SELECT dataset, backbone, device, metric, avg(value) AS cam_mean FROM comparison
    WHERE method = 'cam' AND uda = 'none' AND variant = '' AND device IS NOT NULL
    GROUP BY dataset, backbone, device, metric),
paper_cam AS (
    SELECT dataset, backbone, metric, value AS paper_cam FROM paper_reference
    WHERE method = 'cam' AND uda = 'none' AND variant = '')
SELECT g.*, g.mean / c.cam_mean AS ratio_to_cam,
       CASE WHEN g.dataset_kind = 'benchmark' THEN g.paper / pc.paper_cam END AS paper_ratio_to_cam
FROM groups g
LEFT JOIN cam c ON g.device IS NOT NULL AND c.dataset = g.dataset AND c.backbone = g.backbone
                   AND c.device = g.device AND c.metric = g.metric
LEFT JOIN paper_cam pc ON g.device IS NOT NULL AND pc.dataset = g.dataset AND pc.backbone = g.backbone
                          AND pc.metric = g.metric
ORDER BY g.dataset_kind, g.dataset, g.backbone, g.method, g.uda, g.variant, g.setting_id,
         coalesce(list_position($metrics, g.metric), 1000), g.metric, g.device
"""


def comparison_rows(store_path: str | os.PathLike, dataset: str | None = None, method: str | None = None,
                    uda: str | None = None) -> list[dict[str, Any]]:
    """Per setting (runs that differ by seed only), device (timings) and metric: the seed count,
    the mean and sample std over seeds, the paper's figure and its table where it has one, and
    for timings the ratio to the same-device CAM baseline beside the paper's ratio."""
    with open_store(store_path, read_only=True) as con:
        return comparison_rows_of(con, dataset, method, uda)


def comparison_rows_of(con: Any, dataset: str | None = None, method: str | None = None,
                       uda: str | None = None) -> list[dict[str, Any]]:
    """`comparison_rows` on an open store (the report reads several things in one connection)."""
    cursor = con.execute(_COMPARISON_SQL, {"dataset": dataset, "method": method, "uda": uda,
                                           "metrics": list(METRICS)})
    names = [column[0] for column in cursor.description]
    rows = [dict(zip(names, values)) for values in cursor.fetchall()]
    return [{name: row[name] for name in COMPARISON_COLUMNS} for row in rows]


def _cell(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """The comparison as a text table, one line per setting and metric."""
    if not rows:
        return "no runs in the store match"
    header = ["dataset", "backbone", "method", "uda", "variant", "setting", "λ1", "λ2", "n", "metric", "device",
              "mean ± std", "paper"]
    lines = [header]
    for row in rows:
        ours = _cell(row["mean"]) + ("" if row["std"] is None else f" ± {row['std']:.2f}")
        if row["ratio_to_cam"] is not None:
            ours += f" ({row['ratio_to_cam']:.2f}x CAM)"
        if row["dataset_kind"] == "embedded":
            paper = "n/a (embedded default)"
        elif row["paper"] is None:
            paper = "-"
        else:
            paper = f"{row['paper']:.2f}"
            if row["paper_ratio_to_cam"] is not None:
                paper += f" ({row['paper_ratio_to_cam']:.2f}x CAM)"
            paper += f" [Table {row['paper_table']}]"
        lines.append([row["dataset"] or "-", row["backbone"] or "-", row["method"] or "-", row["uda"] or "-",
                      row["variant"] or "-", row["setting_id"][:8], _cell(row["lambda1"], 3).rstrip("0").rstrip("."),
                      _cell(row["lambda2"], 3).rstrip("0").rstrip("."), str(row["n"]), row["metric"],
                      row["device"] or "-", ours, paper])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
    notes = ["test split; mean ± sample std over the seeds of each setting (runs that differ by seed only)",
             "timings: compare the ratio to the same device's CAM baseline, not milliseconds (spec §7)"]
    if any(row["dataset_kind"] == "embedded" for row in rows):
        notes.append("the embedded default (SyntheticBoxes/SyntheticMasks) is generated data: its figures are "
                     "not comparable to the paper's CUB/ILSVRC/OpenImages figures")
    return text + "\n\n" + "\n".join(f"- {note}" for note in notes)


def comparison_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COMPARISON_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "seeds": " ".join(str(seed) for seed in row["seeds"])})
    return out.getvalue()
