"""Tune DA-WSOL's λ1/λ2 on the val split with Optuna: each trial a run folder, the study in a storage.

    wsolbench tune --study-dir runs/tune-cub-cam-mmd --dataset CUB --data-root ... --method cam --uda mmd \\
                   --n-trials 30 [--storage sqlite:///... | postgresql://... | journal:PATH] [--timeout SECONDS]

The study samples `lambda1` and `lambda2` log-uniformly (TPE, seeded) in the ranges given; every
other setting is the config of `wsolbench train` (the same flags, TOML keys and recipe), fixed for
the whole study. A trial is `experiment.fit` without the test split (its metadata and images are
never opened) into `<study-dir>/trials/<run_id>`: the lambdas are identity fields, so each pair has
its own run_id and folder, and a retried trial (same pair) resumes that folder from its checkpoint.
The objective is the last epoch's val figure: MaxBoxAccV2 (`maxboxacc_v2`; `maxboxacc` with
`--box-metric v1`) on a box dataset, PxAP (`pxap`) on a mask dataset. Each val epoch is reported
to a MedianPruner that prunes only once DA-WSOL has trained (a 1-based epoch > start_epoch + 1).

Sharing and resuming (any number of `wsolbench tune` processes on one storage and study dir):
- A trial is claimed under a study lock (an flock beside the storage file, in the study dir for
  a database server, or a PostgreSQL advisory lock on a PostgreSQL server): the worker fails stale trials, counts COMPLETE + PRUNED + RUNNING trials and
  only then creates its trial, so `--n-trials N` is the number of finished (COMPLETE or PRUNED)
  trials in the study, over every invocation and worker, never exceeded. A worker whose N is
  reached by trials still running elsewhere waits for them, so that one dying is still retried.
- Stale trials: on an RDB storage, Optuna's heartbeat (`heartbeat_interval`, `grace_period` =
  `stale_after`) fails a trial whose worker stopped beating and re-enqueues it
  (RetryHeartbeatStaleTrialCallback). The journal storage has no heartbeat, so the worker does the
  same itself: a RUNNING trial whose worker (host, pid in its user attrs) is a dead process of this
  host, or whose `heartbeat` user attr is older than `stale_after`, is failed and re-enqueued with
  the same callback. A trial interrupted by Ctrl-C is failed and re-enqueued too.
- Sampler seeds: the TPE sampler of the k-th worker to join a study (k = 0, 1, ... in the order
  they joined, recorded in the study's user attrs) is seeded `sampler_seed + k`, so concurrent or
  successive workers never replay one random sequence, and a fresh study's first trial is the
  same for a given seed.

Writes `<study-dir>/best.json` (atomically, after every trial and at the end): the best λ pair,
its val score, the metric, its trial number and run_id, the study's name and storage, and the
trial table. tune drives training (experiment) and never imports store or report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from wsolbench import atomic
from wsolbench.config import TrainConfig, identity_change, run_id, run_identity
from wsolbench.datasets.metadata import read_split
from wsolbench.errors import WsolbenchError
from wsolbench.experiment import fit, pretrained_weight_file
from wsolbench.methods.backbones.pretrained import sha256_of_file
from wsolbench.runfolder import RunFolder

Log = Callable[[str], None]

DEFAULT_LAMBDA1_RANGE = (0.03, 3.0)
DEFAULT_LAMBDA2_RANGE = (0.1, 10.0)
TUNED_FIELDS = ("lambda1", "lambda2")
# What --n-trials counts: a pruned trial is a finished answer (its value: the last val figure it
# reported), a failed one is not (it is retried or replaced).
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
BEST_FILE = "best.json"
STUDY_ATTR = "wsolbench_tune"  # the study's settings, checked when a worker joins
WORKER_ATTR_PREFIX = "worker_"  # worker_<k>: the k-th worker to join (host, pid, sampler seed, start)


@dataclass
class TuneSettings:
    """How to run the study (the training config is separate: a TrainConfig)."""

    study_dir: Path
    n_trials: int | None = None  # finished (COMPLETE + PRUNED) trials in the study; None: until timeout
    timeout: float | None = None  # seconds after which this worker starts no new trial
    study_name: str | None = None  # default: lambda-<dataset>-<method>-<uda>
    storage: str | None = None  # see storage_spec; default sqlite:///<study_dir>/study.db
    lambda1_range: tuple[float, float] = DEFAULT_LAMBDA1_RANGE
    lambda2_range: tuple[float, float] = DEFAULT_LAMBDA2_RANGE
    sampler_seed: int = 0
    prune: bool = True
    prune_startup_trials: int = 5  # MedianPruner: finished trials before any pruning
    heartbeat_interval: int = 30  # seconds
    stale_after: int = 120  # seconds without a heartbeat before a RUNNING trial is failed
    max_retry: int = 3  # retries of one trial (killed workers), then it stays failed

    def check(self) -> "TuneSettings":
        problems = []
        if self.n_trials is None and self.timeout is None:
            problems.append("pass --n-trials or --timeout (or both)")
        if self.n_trials is not None and self.n_trials < 1:
            problems.append(f"--n-trials must be positive (got {self.n_trials})")
        if self.timeout is not None and not self.timeout > 0:
            problems.append(f"--timeout must be positive (got {self.timeout})")
        for name, (low, high) in (("--lambda1-range", self.lambda1_range), ("--lambda2-range", self.lambda2_range)):
            if not (0 < low < high and math.isfinite(high)):
                problems.append(f"{name} must be LOW HIGH with 0 < LOW < HIGH (log-uniform; got {low:g} {high:g})")
        if self.heartbeat_interval < 1:
            problems.append(f"--heartbeat-interval must be >= 1 second (got {self.heartbeat_interval})")
        if self.stale_after <= self.heartbeat_interval:
            problems.append(f"--stale-after must exceed --heartbeat-interval (got {self.stale_after} <= "
                            f"{self.heartbeat_interval})")
        if self.max_retry < 0 or self.prune_startup_trials < 0:
            problems.append("--max-retry and --prune-startup-trials must be >= 0")
        if problems:
            raise WsolbenchError("; ".join(problems))
        return self


# ---- storage --------------------------------------------------------------------------------------

@dataclass
class StorageSpec:
    """Where the study lives. `kind` "rdb": `location` is a SQLAlchemy URL; "journal": a file path."""

    kind: str
    location: str
    lock_path: Path  # the study lock (flock) shared by every worker of the storage

    @property
    def display(self) -> str:
        """The storage as best.json and the logs name it (a URL's password hidden)."""
        if self.kind == "journal":
            return f"journal:{self.location}"
        from sqlalchemy.engine import make_url

        return make_url(self.location).render_as_string(hide_password=True)


def storage_spec(text: str | None, study_dir: Path) -> StorageSpec:
    """`--storage`: an RDB URL (anything with "://", e.g. sqlite:///study.db, postgresql://...),
    `journal:PATH` or a PATH ending in .log or .jsonl (Optuna's journal file storage), `journal`
    (the journal file <study-dir>/study.log); default: the SQLite file <study-dir>/study.db."""
    study_dir = Path(study_dir).absolute()
    if text is None:
        database = study_dir / "study.db"
        return StorageSpec("rdb", f"sqlite:///{database}", Path(f"{database}.tune-lock"))
    if text == "journal" or text.startswith("journal:") or ("://" not in text and text.endswith((".log", ".jsonl"))):
        path = study_dir / "study.log" if text == "journal" else Path(text.removeprefix("journal:")).absolute()
        if not path.name:
            raise WsolbenchError(f"--storage {text}: journal:PATH needs a file path")
        # Not <path>.lock: JournalFileBackend's own lock file.
        return StorageSpec("journal", str(path), Path(f"{path}.tune-lock"))
    if "://" not in text:
        raise WsolbenchError(f"--storage {text}: expected an RDB URL (e.g. sqlite:///study.db), journal:PATH, "
                             f"or a journal file ending in .log or .jsonl")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except ArgumentError as error:
        raise WsolbenchError(f"--storage {text}: not a SQLAlchemy URL ({error})") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return StorageSpec("rdb", text, Path(f"{Path(url.database).absolute()}.tune-lock"))
    return StorageSpec("rdb", text, study_dir / "tune.lock")


def retry_callback(settings: TuneSettings) -> RetryHeartbeatStaleTrialCallback:
    """Optuna's re-enqueueing of a failed trial (same params; `retried_trial_number` names the
    original), used for stale trials on both storages and for interrupted ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)


def open_storage(spec: StorageSpec, settings: TuneSettings) -> optuna.storages.BaseStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = retry_callback(settings)
        if spec.kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            Path(spec.location).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(spec.location))
        from sqlalchemy.engine import make_url

        sqlite = make_url(spec.location).get_backend_name() == "sqlite"
        if sqlite and make_url(spec.location).database:
            Path(make_url(spec.location).database).absolute().parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(
            spec.location, engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
            heartbeat_interval=settings.heartbeat_interval, grace_period=settings.stale_after,
            heartbeat_stale_trial_callback=retry)


class StudyLock:
    """An exclusive flock on one file: held while a worker fails stale trials, counts trials and
    creates its own, so no two workers claim the same last trial. Released at most once per hold."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a+")  # noqa: SIM115 (held for the worker's lifetime)
        self.held = False

    def acquire(self) -> None:
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)

    def close(self) -> None:
        self.release()
        self._file.close()


class AdvisoryLock:
    """The study lock on a PostgreSQL server: a session advisory lock keyed by the study's name.

    Workers that share only the database (on other machines) then exclude one another without
    a shared file system's flock, and a worker that dies releases the lock with its connection.
    Same interface as StudyLock."""

    def __init__(self, url: str, study_name: str):
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.key = int.from_bytes(hashlib.sha256(f"wsolbench tune {study_name}".encode()).digest()[:8], "big",
                                  signed=True)
        self._engine = create_engine(url, poolclass=NullPool)
        # Autocommit: the lock is held by the session, not by a transaction left open for hours.
        self._connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self.held = False

    def _call(self, function: str) -> None:
        from sqlalchemy import text

        self._connection.execute(text(f"SELECT {function}(:key)"), {"key": self.key})

    def acquire(self) -> None:
        self._call("pg_advisory_lock")
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._call("pg_advisory_unlock")

    def close(self) -> None:
        self.release()
        self._connection.close()
        self._engine.dispose()


def open_study_lock(spec: StorageSpec, study_name: str) -> StudyLock | AdvisoryLock:
    """An advisory lock on a PostgreSQL storage, else the flock of spec.lock_path."""
    if spec.kind == "rdb":
        from sqlalchemy.engine import make_url

        if make_url(spec.location).get_backend_name() == "postgresql":
            return AdvisoryLock(spec.location, study_name)
    return StudyLock(spec.lock_path)


# ---- stale trials on the journal storage ------------------------------------------------------------

def process_is_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def is_stale(trial: FrozenTrial, stale_after: float, now: float | None = None) -> bool:
    """A RUNNING trial nobody runs: its worker is a dead process of this host, or its last
    heartbeat (or, before the first one, its start) is older than `stale_after` seconds."""
    now = time.time() if now is None else now
    worker = trial.user_attrs.get("worker")
    if isinstance(worker, dict) and worker.get("host") == socket.gethostname() and \
            not process_is_alive(int(worker.get("pid", -1))):
        return True
    beat = trial.user_attrs.get("heartbeat")
    if beat is None:
        beat = trial.datetime_start.timestamp() if trial.datetime_start is not None else now
    return now - float(beat) > stale_after


def fail_stale_journal_trials(study: optuna.Study, settings: TuneSettings, log: Log) -> list[int]:
    """Fail the journal's stale RUNNING trials and re-enqueue each (same params) as Optuna's
    heartbeat does on an RDB storage. Call under the study lock. Returns the failed numbers."""
    retry = retry_callback(settings)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_stale(trial, settings.stale_after):
            frozen = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            if frozen.state != TrialState.FAIL:
                continue
            log(f"trial {trial.number}: its worker {trial.user_attrs.get('worker')} is gone; failed and "
                f"re-enqueued with the same lambdas")
            retry(study, frozen)
            failed.append(trial.number)
    return failed


def fail_stale_trials(study: optuna.Study, spec: StorageSpec, settings: TuneSettings, log: Log) -> None:
    if spec.kind == "journal":
        fail_stale_journal_trials(study, settings, log)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextlib.contextmanager
def journal_heartbeat(trial: Trial, interval: float):
    """Record `heartbeat` (seconds since the epoch) in the trial's user attrs every `interval`."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            trial.set_user_attr("heartbeat", time.time())

    thread = threading.Thread(target=beat, name="wsolbench-tune-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---- the study --------------------------------------------------------------------------------------

def objective_metric(config: TrainConfig) -> str:
    """The val figure tuned: PxAP on a mask split, MaxBoxAccV2 (MaxBoxAcc with box_metric v1) on boxes."""
    meta = read_split(config.metadata_root, config.dataset, config.val_split)
    if meta.localization == "masks":
        return "pxap"
    if meta.localization == "boxes":
        return "maxboxacc" if config.box_metric == "v1" else "maxboxacc_v2"
    raise WsolbenchError(f"{meta.file('localization')}: {meta.dataset}/{meta.split} has no boxes or masks, so "
                         f"it cannot be tuned on")


def pruning_warmup_steps(config: TrainConfig) -> int:
    """MedianPruner's n_warmup_steps, steps being 1-based epochs: DA-WSOL trains in 0-based epochs
    > start_epoch (spec §5.7), so the first report it has shaped is 1-based epoch start_epoch + 2."""
    return max(0, config.start_epoch + 2)


def default_study_name(config: TrainConfig) -> str:
    return f"lambda-{config.dataset}-{config.method}-{config.uda}"


def check_tunable(config: TrainConfig) -> None:
    if config.uda == "none":
        raise WsolbenchError("tune searches DA-WSOL's lambda1/lambda2: pass --uda mmd or --uda dann")


def trial_config(base: TrainConfig, lambda1: float, lambda2: float, trials_dir: Path,
                 pretrained_sha256: str | None) -> tuple[TrainConfig, str]:
    """The config of one trial (the base with the pair, in the folder of its run_id) and its run_id."""
    config = dataclasses.replace(base, lambda1=float(lambda1), lambda2=float(lambda2))
    rid = run_id(run_identity(config, pretrained_sha256))
    config = dataclasses.replace(config, out=str(trials_dir / rid)).validate()
    return config, rid


def _study_record(base: TrainConfig, metric: str, settings: TuneSettings, pretrained_sha256: str | None) -> dict:
    identity = {k: v for k, v in run_identity(base, pretrained_sha256).items() if k not in TUNED_FIELDS}
    return {"metric": metric, "direction": "maximize", "split": base.val_split,
            "lambda1_range": list(settings.lambda1_range), "lambda2_range": list(settings.lambda2_range),
            "identity": identity}


def _check_joins(saved: dict[str, Any], current: dict[str, Any], study_name: str) -> None:
    """A worker joins a study only with the study's own settings (the lambdas aside)."""
    change = identity_change(saved.get("identity", {}), current["identity"])
    if change:
        raise WsolbenchError(f"study {study_name!r} tunes another training config: {change}; use the same "
                             f"settings or another --study-name")
    for key in ("metric", "split", "lambda1_range", "lambda2_range"):
        if saved.get(key) != current[key]:
            raise WsolbenchError(f"study {study_name!r} was started with {key} {saved.get(key)!r}, this worker "
                                 f"has {current[key]!r}; use the same or another --study-name")


def join_study(storage: optuna.storages.BaseStorage, study_name: str, record: dict[str, Any],
               settings: TuneSettings, pruner: optuna.pruners.BasePruner,
               lock: StudyLock | AdvisoryLock) -> tuple[optuna.Study, int]:
    """Create or load the study, check its settings, register this worker; returns the study with
    this worker's seeded sampler, and the worker's number (0 for the first to join)."""
    lock.acquire()
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                    load_if_exists=True, sampler=optuna.samplers.RandomSampler(seed=0))
        saved = study.user_attrs.get(STUDY_ATTR)
        if saved is None:
            study.set_user_attr(STUDY_ATTR, record)
        else:
            _check_joins(saved, record, study_name)
        worker = sum(1 for key in study.user_attrs if key.startswith(WORKER_ATTR_PREFIX))
        seed = settings.sampler_seed + worker
        study.set_user_attr(f"{WORKER_ATTR_PREFIX}{worker}", {
            "host": socket.gethostname(), "pid": os.getpid(), "sampler_seed": seed,
            "joined": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    finally:
        lock.release()
    # constant_liar: a worker's TPE treats the trials other workers are running as bad results, so
    # concurrent workers spread out instead of proposing neighbours (Optuna's advice for parallel TPE).
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner), worker


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """The trial table of best.json: number, state, lambdas, value, run_id, duration (s)."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({
            "number": trial.number, "state": trial.state.name,
            "lambda1": trial.params.get("lambda1"), "lambda2": trial.params.get("lambda2"),
            "value": trial.value, "run_id": trial.user_attrs.get("run_id"),
            "duration_s": trial.duration.total_seconds() if trial.duration is not None else None,
            "retry_of": trial.system_attrs.get("failed_trial"), "run_folder": trial.user_attrs.get("run_folder")})
    return rows


def best_record(study: optuna.Study, spec: StorageSpec, settings: TuneSettings) -> dict[str, Any]:
    """What best.json holds, read from the storage."""
    saved = study.user_attrs.get(STUDY_ATTR, {})
    rows = trial_rows(study)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = study.best_trial if complete else None
    counts = {state.name: sum(1 for row in rows if row["state"] == state.name) for state in TrialState}
    return {
        # storage: what --storage takes back (an RDB URL, password hidden, or journal:PATH)
        "study_name": study.study_name, "storage": spec.display, "storage_kind": spec.kind,
        "study_dir": str(Path(settings.study_dir).absolute()),
        "metric": saved.get("metric"), "split": saved.get("split"), "direction": "maximize",
        "best": None if best is None else {
            "lambda1": best.params["lambda1"], "lambda2": best.params["lambda2"], "value": best.value,
            "trial": best.number, "run_id": best.user_attrs.get("run_id"),
            "run_folder": best.user_attrs.get("run_folder")},
        "n_trials": settings.n_trials, "finished": counts["COMPLETE"] + counts["PRUNED"],
        "counts": counts, "lambda1_range": saved.get("lambda1_range"), "lambda2_range": saved.get("lambda2_range"),
        "identity": saved.get("identity"), "trials": rows,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def format_trials(record: dict[str, Any]) -> str:
    """A readable table of best.json's trials and its best line."""
    header = ["trial", "state", "lambda1", "lambda2", record.get("metric") or "value", "run_id", "seconds"]
    lines = [header]
    for row in record["trials"]:
        lines.append([str(row["number"]), row["state"].lower(),
                      *(f"{row[k]:.4g}" if row[k] is not None else "-" for k in ("lambda1", "lambda2")),
                      f"{row['value']:.2f}" if row["value"] is not None else "-", row["run_id"] or "-",
                      f"{row['duration_s']:.0f}" if row["duration_s"] is not None else "-"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.rjust(w) if i in (0, 2, 3, 4, 6) else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))) for line in lines)
    best = record["best"]
    if best is None:
        return text + "\nno trial completed yet"
    return (text + f"\nbest: trial {best['trial']}, lambda1 {best['lambda1']:.4g}, lambda2 {best['lambda2']:.4g}, "
                   f"val {record['metric']} {best['value']:.2f} (run {best['run_id']})")


def write_best(study: optuna.Study, spec: StorageSpec, settings: TuneSettings) -> dict[str, Any]:
    record = best_record(study, spec, settings)
    atomic.write_json(Path(settings.study_dir) / BEST_FILE, record)
    return record


def with_best_lambdas(config: TrainConfig, best_path: str | os.PathLike) -> TrainConfig:
    """`config` with the best pair of a study's best.json (`wsolbench train --lambdas-from`), once its
    training setting is known to be the study's: the identity without the lambdas (the seed, the
    pretrained weights' sha256 and every recipe value included) must equal the one best.json
    records, so the run trained on the full recipe and scored on test is the setting tuned on val."""
    from wsolbench.runfolder import read_json_object

    path = Path(best_path)
    record = read_json_object(path)
    best = record.get("best")
    if not isinstance(best, dict) or not all(isinstance(best.get(k), (int, float)) for k in TUNED_FIELDS):
        raise WsolbenchError(f"{path}: no completed trial in study {record.get('study_name')!r} yet, so no best "
                             f"lambda pair (run more trials)")
    check_tunable(config)
    config = dataclasses.replace(config, lambda1=float(best["lambda1"]), lambda2=float(best["lambda2"])).validate()
    weights = pretrained_weight_file(config)
    current = {k: v for k, v in run_identity(config, sha256_of_file(weights) if weights is not None else None).items()
               if k not in TUNED_FIELDS}
    saved = record.get("identity")
    if not isinstance(saved, dict):
        raise WsolbenchError(f"{path}: holds no training identity, so the setting cannot be checked")
    change = identity_change(saved, current)
    if change:
        raise WsolbenchError(f"{path}: the study tuned another setting: {change}; train with the study's settings")
    return config


def tune(base: TrainConfig, settings: TuneSettings, log: Log = print,
         progress_factory: Callable[[str, int], Any] | None = None) -> dict[str, Any]:
    """Run one worker of the study until `n_trials` trials are finished in it or `timeout` passes;
    returns best.json's content. `base.out` is ignored: each trial has its run folder."""
    settings.check()
    check_tunable(base)
    study_dir = Path(settings.study_dir).absolute()
    trials_dir = study_dir / "trials"
    metric = objective_metric(base)
    weights = pretrained_weight_file(base)
    pretrained_sha256 = sha256_of_file(weights) if weights is not None else None
    spec = storage_spec(settings.storage, study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    study_name = settings.study_name or default_study_name(base)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=settings.prune_startup_trials,
                                          n_warmup_steps=pruning_warmup_steps(base))
              if settings.prune else optuna.pruners.NopPruner())
    lock = open_study_lock(spec, study_name)
    try:
        # Under the study lock: Optuna creates its tables when a storage is first opened, and
        # workers started together on a fresh PostgreSQL database otherwise fail on each other's
        # CREATE TABLE (IntegrityError; 1-2 of 3 processes, measured).
        lock.acquire()
        try:
            storage = open_storage(spec, settings)
        finally:
            lock.release()
        study, worker = join_study(storage, study_name, _study_record(base, metric, settings, pretrained_sha256),
                                   settings, pruner, lock)
    except BaseException:
        lock.close()
        raise
    log(f"study {study_name!r} in {spec.display}: worker {worker} (sampler seed {settings.sampler_seed + worker}), "
        f"tuning lambda1 in {settings.lambda1_range}, lambda2 in {settings.lambda2_range} on val {metric}")
    current: dict[str, int] = {}

    def objective(trial: Trial) -> float:
        # Called with the study lock held (this worker's claim): the trial gets its pair, run_id and
        # worker before any other worker can see it, then the lock is let go for the training.
        try:
            current["number"] = trial.number
            lambda1 = trial.suggest_float("lambda1", *settings.lambda1_range, log=True)
            lambda2 = trial.suggest_float("lambda2", *settings.lambda2_range, log=True)
            config, rid = trial_config(base, lambda1, lambda2, trials_dir, pretrained_sha256)
            trial.set_user_attr("run_id", rid)
            trial.set_user_attr("run_folder", config.out)
            trial.set_user_attr("objective", metric)  # what `value` is (val split), for readers of the storage
            trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "index": worker})
            trial.set_user_attr("heartbeat", time.time())
        finally:
            lock.release()
        reported: set[int] = set()

        def on_val(epoch: int, figures: dict[str, Any]) -> None:
            trial.report(figures[metric], epoch)
            reported.add(epoch)
            # The last epoch is never pruned: its training is already paid for, and a trial that
            # finished its schedule is an answer of the study (COMPLETE), not a stopped one.
            if epoch < config.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"val {metric} {figures[metric]:.2f} at epoch {epoch}")

        folder = RunFolder(config.out)
        resume = not folder.is_empty()
        log(f"trial {trial.number}: lambda1 {lambda1:.4g}, lambda2 {lambda2:.4g} -> {config.out}"
            f"{' (resuming)' if resume else ''}")
        prefixed = lambda line: log(f"[trial {trial.number}] {line}")  # noqa: E731
        beating = journal_heartbeat(trial, settings.heartbeat_interval) if spec.kind == "journal" \
            else contextlib.nullcontext()
        with beating:
            run = fit(config, resume=resume, log=prefixed, progress_factory=progress_factory, on_val=on_val,
                      with_test=False)
        if run.record["run_id"] != rid:
            raise WsolbenchError(f"{config.out}: trained as run {run.record['run_id']}, expected {rid}")
        # The epochs a resumed trial restored from the checkpoint were reported by the trial it retries.
        for entry in run.val_history:
            if entry["epoch"] not in reported and entry.get(metric) is not None:
                trial.report(entry[metric], entry["epoch"])
        value = run.val_history[-1][metric]
        if value is None:
            raise WsolbenchError(f"{config.out}: the last val epoch has no {metric}")
        return float(value)

    started = time.monotonic()
    poll = min(2.0, float(settings.heartbeat_interval))
    waiting_logged = False
    try:
        while True:
            if settings.timeout is not None and time.monotonic() - started >= settings.timeout:
                log(f"timeout ({settings.timeout:g} s): no new trial")
                break
            lock.acquire()
            try:
                fail_stale_trials(study, spec, settings, log)
                states = [t.state for t in study.get_trials(deepcopy=False)]
                finished = sum(state in FINISHED_STATES for state in states)
                running = states.count(TrialState.RUNNING)
                if settings.n_trials is not None and finished >= settings.n_trials:
                    log(f"{finished} trials finished in the study (--n-trials {settings.n_trials})")
                    break
                if settings.n_trials is not None and finished + running >= settings.n_trials:
                    lock.release()
                    if not waiting_logged:
                        log(f"waiting for the {running} running trial(s) of other workers")
                        waiting_logged = True
                    time.sleep(poll)
                    continue
                waiting_logged = False
                current.clear()
                try:
                    study.optimize(objective, n_trials=1, catch=())  # the objective releases the lock
                except KeyboardInterrupt:
                    _retry_interrupted(study, current.get("number"), settings, log)
                    raise
            finally:
                lock.release()
            write_best(study, spec, settings)
    finally:
        lock.close()
    return write_best(study, spec, settings)


def _retry_interrupted(study: optuna.Study, number: int | None, settings: TuneSettings, log: Log) -> None:
    """A trial stopped by Ctrl-C is failed by Optuna; enqueue it again, as a killed worker's is."""
    if number is None:
        return
    trial = study.get_trials(deepcopy=False)[number]
    if trial.state == TrialState.FAIL:
        retry_callback(settings)(study, trial)
        log(f"trial {number}: interrupted; re-enqueued with the same lambdas")
