"""`wsolbench tune`: λ1/λ2 tuned on val only, each trial a run folder, a study shared by processes,
killed workers' trials retried, --n-trials counting the study's finished trials, best.json.

Every study here trains on a dataset whose test split is gone (metadata and images), so each test
also shows that tuning never reads it."""
from __future__ import annotations

import json
import os
import shutil
import glob
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from wsolbench.cli import main
from wsolbench.config import resolve_config
from wsolbench.datasets import synthetic
from wsolbench.errors import WsolbenchError
from wsolbench.experiment import fit, train_and_evaluate
from wsolbench.runfolder import RunFolder
from wsolbench.tune import AdvisoryLock, TuneSettings, pruning_warmup_steps, storage_spec, tune

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

EPOCHS = 2


# ---- a throwaway PostgreSQL server (Debian's postgresql: initdb, pg_ctl) ---------------------------

def _postgres_tool(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


class PostgresServer:
    """A PostgreSQL server in a temporary folder, on a loopback port, trusting local connections;
    run as the `postgres` user when the tests run as root (initdb refuses root)."""

    def __init__(self):
        self.tools = {name: _postgres_tool(name) for name in ("initdb", "pg_ctl")}
        self.root = Path(tempfile.mkdtemp(prefix="wsolbench-postgres-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.databases = 0

    def run(self, *command: str) -> None:
        done = subprocess.run([*self.as_user, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command[0]} failed: {done.stdout}{done.stderr}"

    def start(self) -> None:
        data = self.root / "data"
        self.run(self.tools["initdb"], "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.run(self.tools["pg_ctl"], "-D", str(data), "-w", "-l", str(self.root / "server.log"), "-o",
                 f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        subprocess.run([*self.as_user, self.tools["pg_ctl"], "-D", str(self.root / "data"), "-m", "immediate",
                        "stop"], capture_output=True, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self) -> str:
        """A fresh database on the server: its SQLAlchemy URL."""
        import psycopg2

        self.databases += 1
        name = f"study{self.databases}"
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        connection.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def postgres():
    """The module's PostgreSQL server; CI (WSOLBENCH_REQUIRE_POSTGRES=1) fails rather than skips."""
    required = os.environ.get("WSOLBENCH_REQUIRE_POSTGRES") == "1"
    missing = [name for name in ("initdb", "pg_ctl") if _postgres_tool(name) is None]
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing.append("psycopg2 (pip install psycopg2-binary)")
    if missing:
        if required:
            pytest.fail(f"PostgreSQL tests need {', '.join(missing)}")
        pytest.skip(f"no {', '.join(missing)} here")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def storage_arguments(storage: str, request) -> tuple[str, ...]:
    """--storage for a parametrized storage kind: journal, sqlite (the default) or postgresql."""
    if storage == "journal":
        return ("--storage", "journal")
    if storage == "postgresql":
        return ("--storage", request.getfixturevalue("postgres").new_database())
    return ()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The tiny generated dataset with its test split removed: any read of it fails."""
    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.generate(root, seed=3, num_classes=2, train_per_class=2, val_per_class=2, test_per_class=1,
                       source_classes=0)
    shutil.rmtree(root / "images" / "test")
    for dataset in ("SyntheticBoxes", "SyntheticMasks"):
        shutil.rmtree(root / "metadata" / dataset / "test")
    return root


def train_values(data: Path, **overrides) -> dict:
    values = dict(dataset="SyntheticBoxes", data_root=str(data / "images"), metadata_root=str(data / "metadata"),
                  mask_root=str(data / "masks"), method="cam", uda="mmd", pretrained="none", image_size=64,
                  epochs=EPOCHS, batch_size=4, eval_batch_size=4, workers=0, eval_frequency=1, lr=0.01,
                  device="cpu", seed=1, source_samples=4, target_samples=4, start_epoch=0)
    values.update(overrides)
    return values


def base_config(data: Path, **overrides):
    return resolve_config({**train_values(data, **overrides), "out": "unused"})


def cli_args(data: Path, study_dir: Path, **overrides) -> list[str]:
    argv = ["tune", "--study-dir", str(study_dir), "--quiet"]
    for name, value in train_values(data, **overrides).items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def quiet(line: str) -> None:
    pass


def load(record: dict) -> optuna.Study:
    """The study best.json names, opened from its storage as a reader (the report) would."""
    text = record["storage"]
    if record["storage_kind"] == "journal":
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(text.removeprefix("journal:")))
    else:
        storage = text
    return optuna.load_study(study_name=record["study_name"], storage=storage)


def first_pair_of(seed: int) -> dict[str, float]:
    """What TPE seeded `seed` proposes first for tune's two log-uniform lambdas."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True))
    trial = study.ask()
    return {"lambda1": trial.suggest_float("lambda1", 0.03, 3.0, log=True),
            "lambda2": trial.suggest_float("lambda2", 0.1, 10.0, log=True)}


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


@pytest.fixture(scope="module")
def sqlite_study(data, tmp_path_factory):
    """One study on the default SQLite storage, run by three invocations: --n-trials 1, 2, then 2."""
    study_dir = tmp_path_factory.mktemp("tune") / "study"
    config = base_config(data)
    records = [tune(config, TuneSettings(study_dir=study_dir, n_trials=n), log=quiet) for n in (1, 2, 2)]
    return study_dir, records


def test_the_test_split_is_gone_so_a_full_run_would_fail(data, tmp_path):
    with pytest.raises(WsolbenchError, match="test"):
        train_and_evaluate(resolve_config({**train_values(data), "out": str(tmp_path / "run")}), log=quiet)


def test_tuning_trains_and_scores_on_val_without_reading_the_test_split(data, sqlite_study, monkeypatch):
    study_dir, records = sqlite_study
    assert records[0]["counts"]["COMPLETE"] == 1 and records[0]["metric"] == "maxboxacc_v2"
    folder = RunFolder(records[0]["trials"][0]["run_folder"])
    assert folder.path.parent == study_dir.absolute() / "trials"
    # A trial folder is fit's: config, checkpoint, history; nothing of a test split.
    assert folder.config.is_file() and folder.checkpoint.is_file() and folder.history.is_file()
    assert not folder.is_complete() and not (folder.path / "scoremaps").exists()
    assert not (folder.path / "predictions").exists()
    history = folder.read_history()
    assert [entry["epoch"] for entry in history["val"]] == list(range(1, EPOCHS + 1))
    assert records[0]["trials"][0]["value"] == history["val"][-1]["maxboxacc_v2"]
    # And nothing tune calls asks for the test split, even where it would exist.
    import wsolbench.datasets.metadata as metadata
    import wsolbench.experiment as experiment
    import wsolbench.tune as tune_module

    asked = []
    real = metadata.read_split

    def recording(root, dataset, split):
        asked.append(split)
        return real(root, dataset, split)

    for module in (experiment, tune_module):
        monkeypatch.setattr(module, "read_split", recording)
    fit(resolve_config({**train_values(data, epochs=1), "out": str(study_dir.parent / "fit")}), log=quiet,
        with_test=False)
    tune_module.objective_metric(base_config(data))
    assert "test" not in asked and {"train", "val"} <= set(asked)


def test_n_trials_counts_the_finished_trials_of_the_study_over_invocations(sqlite_study):
    study_dir, records = sqlite_study
    assert [r["finished"] for r in records] == [1, 2, 2]
    study = load(records[-1])
    assert [t.number for t in study.trials] == [0, 1]  # the third invocation started none
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    # Three workers joined, seeded 0, 1, 2.
    workers = {k: v for k, v in study.user_attrs.items() if k.startswith("worker_")}
    assert [workers[f"worker_{k}"]["sampler_seed"] for k in range(3)] == [0, 1, 2]


def test_the_seeded_sampler_proposes_the_same_first_pair_and_each_worker_its_own_seed(data, sqlite_study,
                                                                                        tmp_path):
    study_dir, records = sqlite_study
    trials = load(records[-1]).trials
    assert trials[0].params == first_pair_of(0)  # the first worker: seed 0
    assert trials[1].params == first_pair_of(1)  # the second worker: seed 0 + 1, not a replay of seed 0
    # A fresh study with the same seed, on the other storage, starts with the same pair.
    again = tune(base_config(data), TuneSettings(study_dir=tmp_path / "again", n_trials=1, storage="journal"),
                 log=quiet)
    assert {k: again["trials"][0][k] for k in ("lambda1", "lambda2")} == trials[0].params


def test_best_json_matches_the_storage(sqlite_study):
    study_dir, records = sqlite_study
    best = json.loads((study_dir / "best.json").read_text())
    assert best == {**records[-1], "written": best["written"]}
    study = load(best)
    assert best["storage"] == f"sqlite:///{study_dir.absolute() / 'study.db'}"
    assert best["metric"] == "maxboxacc_v2" and best["split"] == "val"
    top = study.best_trial
    assert best["best"] == {"lambda1": top.params["lambda1"], "lambda2": top.params["lambda2"], "value": top.value,
                            "trial": top.number, "run_id": top.user_attrs["run_id"],
                            "run_folder": top.user_attrs["run_folder"]}
    assert [(r["number"], r["state"], r["lambda1"], r["lambda2"], r["value"], r["run_id"]) for r in best["trials"]] == \
        [(t.number, t.state.name, t.params["lambda1"], t.params["lambda2"], t.value, t.user_attrs["run_id"])
         for t in study.trials]
    assert all(r["duration_s"] > 0 for r in best["trials"])
    # Each trial's run folder is its own run: the run_id config.json holds, trained with its lambdas.
    for trial in study.trials:
        config = RunFolder(trial.user_attrs["run_folder"]).read_config()
        assert config["run_id"] == trial.user_attrs["run_id"]
        assert (config["config"]["lambda1"], config["config"]["lambda2"]) == \
            (trial.params["lambda1"], trial.params["lambda2"])
    assert len({t.user_attrs["run_id"] for t in study.trials}) == len(study.trials)


def test_a_val_callback_that_raises_leaves_a_folder_that_resumes(data, tmp_path):
    config = resolve_config({**train_values(data), "out": str(tmp_path / "run")})
    seen = []

    def prune_at_first_epoch(epoch, figures):
        seen.append((epoch, figures["maxboxacc_v2"]))
        raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        fit(config, log=quiet, on_val=prune_at_first_epoch, with_test=False)
    folder = RunFolder(config.out)
    assert seen[0][0] == 1 and folder.read_checkpoint()["epoch"] == 0
    assert [e["epoch"] for e in folder.read_history()["val"]] == [1] and not folder.is_complete()
    logs = []
    run = fit(config, resume=True, log=logs.append, with_test=False)
    assert f"resuming at epoch 2/{EPOCHS}" in logs
    assert [e["epoch"] for e in run.val_history] == [1, 2] and run.val_history[0]["maxboxacc_v2"] == seen[0][1]


def test_pruning_waits_for_the_first_epoch_da_wsol_trained():
    # DA-WSOL trains in 0-based epochs > start_epoch; reports are 1-based epochs.
    assert pruning_warmup_steps(resolve_config(dict(dataset="SyntheticBoxes", data_root="x", out="y", uda="mmd",
                                                    start_epoch=0))) == 2
    assert pruning_warmup_steps(resolve_config(dict(dataset="SyntheticBoxes", data_root="x", out="y", uda="mmd",
                                                    start_epoch=-1))) == 1


def test_a_pruner_stops_a_trial_before_its_last_epoch_but_never_at_it(data, tmp_path, monkeypatch):
    # A pruner that always says prune: the first trial stops after epoch 1 of 2 (PRUNED, one report);
    # with one epoch, the only report is the last epoch's, and the trial completes.
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    monkeypatch.setattr(optuna.pruners.MedianPruner, "prune", lambda self, study, trial: True)
    two = tune(base_config(data, start_epoch=-1), TuneSettings(study_dir=tmp_path / "two", n_trials=1), log=quiet)
    one = tune(base_config(data, start_epoch=-1, epochs=1), TuneSettings(study_dir=tmp_path / "one", n_trials=1),
               log=quiet)
    [pruned], [complete] = load(two).trials, load(one).trials
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [1]
    assert complete.state == TrialState.COMPLETE and list(complete.intermediate_values) == [1]


def test_storage_choice(tmp_path):
    assert storage_spec(None, tmp_path).location == f"sqlite:///{tmp_path / 'study.db'}"
    assert storage_spec("journal", tmp_path).display == f"journal:{tmp_path / 'study.log'}"
    assert storage_spec(str(tmp_path / "s.jsonl"), tmp_path).kind == "journal"
    assert storage_spec("journal:x.db", tmp_path).kind == "journal"
    assert storage_spec("postgresql://u:secret@host/db", tmp_path).display == "postgresql://u:***@host/db"
    with pytest.raises(WsolbenchError, match="--storage"):
        storage_spec("study.db", tmp_path)


def test_tune_refuses_flags_it_sets_per_trial_and_baselines(data, tmp_path, capsys):
    assert main([*cli_args(data, tmp_path), "--n-trials", "1", "--lambda1", "0.3"]) == 2
    assert "--lambda1" in capsys.readouterr().err
    assert main([*cli_args(data, tmp_path, uda="none"), "--n-trials", "1"]) == 2
    assert "--uda" in capsys.readouterr().err
    assert not (tmp_path / "trials").exists()


def start_worker(data: Path, study_dir: Path, *extra: str, **overrides) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "wsolbench.cli", *cli_args(data, study_dir, **overrides), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_two_processes_share_one_study_without_running_a_trial_twice(data, tmp_path, storage, request):
    study_dir = tmp_path / "shared"
    args = (*storage_arguments(storage, request), "--n-trials", "4")
    workers = [start_worker(data, study_dir, *args) for _ in range(2)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    best = json.loads((study_dir / "best.json").read_text())
    study = load(best)
    done = finished(study)
    assert len(done) == 4 and len(study.trials) == 4  # exactly n_trials, none beyond
    pairs = [(t.params["lambda1"], t.params["lambda2"]) for t in done]
    assert len(set(pairs)) == 4
    # Both workers trained (seeds 0 and 1) and each trial folder belongs to exactly one trial.
    assert {t.user_attrs["worker"]["pid"] for t in done} == {w.pid for w in workers}
    folders = sorted(Path(t.user_attrs["run_folder"]).name for t in done)
    assert folders == sorted(p.name for p in (study_dir / "trials").iterdir())
    assert len(set(folders)) == 4
    for trial in done:
        assert RunFolder(trial.user_attrs["run_folder"]).read_config()["run_id"] == trial.user_attrs["run_id"]


@pytest.mark.parametrize("storage", ["journal", "sqlite", "postgresql"])
def test_a_killed_workers_trial_is_failed_and_retried_from_its_checkpoint(data, tmp_path, storage, request):
    study_dir = tmp_path / "killed"
    epochs = 5  # long enough to be killed after its first epoch
    stale = ["--heartbeat-interval", "1", "--stale-after", "2"]  # the RDB heartbeat's grace period
    storage_flags = storage_arguments(storage, request)
    extra = ["--n-trials", "1", *storage_flags, *([] if storage == "journal" else stale)]
    worker = start_worker(data, study_dir, *extra, epochs=epochs)
    checkpoints = study_dir / "trials"
    deadline = time.monotonic() + 240
    while not any(checkpoints.glob("*/checkpoints/last.pt")):
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[0]
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    folder = RunFolder(next(checkpoints.iterdir()))
    trained = folder.read_checkpoint()["history"]  # the epochs a resume starts after
    assert 1 <= len(trained) < epochs

    settings = TuneSettings(study_dir=study_dir, n_trials=1, storage=storage_flags[1] if storage_flags else None,
                            heartbeat_interval=1, stale_after=120 if storage == "journal" else 2)
    logs = []
    record = tune(base_config(data, epochs=epochs), settings, log=logs.append)
    study = load(record)
    killed, retry = study.trials
    assert killed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert retry.params == killed.params and retry.user_attrs["run_folder"] == str(folder.path)
    # The retry resumed the folder: the epochs trained before the kill were not trained again.
    assert any(f"resuming at epoch {len(trained) + 1}/{epochs}" in line for line in logs)
    history = folder.read_checkpoint()["history"]
    assert history[:len(trained)] == trained and len(history) == epochs
    assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))
    assert record["best"]["trial"] == 1 and record["finished"] == 1


def test_lambdas_from_best_json_train_the_studys_setting_and_refuse_another(data, tmp_path, capsys):
    from wsolbench.config import run_identity
    from wsolbench.tune import TUNED_FIELDS, with_best_lambdas

    base = base_config(data)
    best = tmp_path / "best.json"
    identity = {k: v for k, v in run_identity(base, None).items() if k not in TUNED_FIELDS}
    best.write_text(json.dumps({"study_name": "s", "best": {"lambda1": 0.7, "lambda2": 1.5}, "identity": identity}))
    config = with_best_lambdas(base, best)
    assert (config.lambda1, config.lambda2) == (0.7, 1.5) and config.lr == base.lr
    with pytest.raises(WsolbenchError, match=r"the study tuned another setting: saved with lr=0\.01, this run has "
                                             r"lr=0\.02; train with the study's settings"):
        with_best_lambdas(base_config(data, lr=0.02), best)
    best.write_text(json.dumps({"study_name": "s", "best": None, "identity": identity}))
    with pytest.raises(WsolbenchError, match=r"no completed trial in study 's' yet"):
        with_best_lambdas(base, best)
    # The CLI: --lambdas-from sets the pair, so a pair given beside it is refused.
    argv = ["train", "--lambdas-from", str(best), "--lambda1", "0.5"]
    for name, value in train_values(data).items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    assert main([*argv, "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    assert "--lambda1: --lambdas-from" in capsys.readouterr().err


def test_the_postgresql_study_lock_excludes_other_workers_and_dies_with_its_connection(postgres):
    url = postgres.new_database()
    first, second = AdvisoryLock(url, "lambda-x"), AdvisoryLock(url, "lambda-x")
    other_study = AdvisoryLock(url, "lambda-y")
    first.acquire()
    other_study.acquire()  # another study's lock is another key
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), got.set()))
    waiter.start()
    assert not got.wait(1.0), "a second worker took the study lock while the first held it"
    first.close()  # as a dying worker's connection would
    assert got.wait(30), "the study lock was not handed on when its holder's connection closed"
    waiter.join()
    second.close()
    other_study.close()
