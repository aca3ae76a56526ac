"""The DVC pipeline (dvc.yaml): `dvc repro` runs every stage into the store, a second one runs nothing,
a new matrix value runs only its new cells, a killed cell resumes from its checkpoint, a rerun of a
completed cell trains from epoch 0, and `dvc exp run -S` / `dvc exp show` work.

The repository's dvc.yaml runs in a throwaway git repository with a tiny params.yaml (2 classes of a
few images at 64 px, 2 epochs, 2 methods x 2 udas, 2 trials). The stages run the installed
`wsolbench`; the package sources are copied beside dvc.yaml only because its stages depend on them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_repo import dvc, dvc_env, git, make_pipeline_repo

pytest.importorskip("dvc", reason="the pipeline tests need DVC (pip install dvc; a dependency of wsolbench)")
duckdb = pytest.importorskip("duckdb")

pytestmark = pytest.mark.slow


TINY_PARAMS = """\
prepare:
  dataset: synthetic
  out: data/synthetic
  seed: 0
  num_classes: 2
  train_per_class: 8
  val_per_class: 2
  test_per_class: 2
  source_classes: 2
  source_train_per_class: 4
  source_val_per_class: 2
pretrain:
  weights: trained
  config: {seed: 0, data_root: data/synthetic/images, metadata_root: data/synthetic/metadata, epochs: 1, image_size: 64, batch_size: 4, eval_batch_size: 4, workers: 0, device: cpu}
config:
  dataset: SyntheticBoxes
  data_root: data/synthetic/images
  metadata_root: data/synthetic/metadata
  mask_root: data/synthetic/masks
  backbone: resnet10_half
  pretrained: data/pretrained/weights.pth
  epochs: 2
  eval_frequency: 1
  image_size: 64
  batch_size: 4
  eval_batch_size: 4
  workers: 0
  device: cpu
  source_samples: 4
  target_samples: 4
train:
  methods: [cam, has]
  udas: [none, mmd]
  seeds: [0]
tune:
  method: cam
  uda: mmd
  seed: 0
  n_trials: 2
  lambda1_range: [0.03, 3.0]
  lambda2_range: [0.1, 10.0]
  sampler_seed: 0
plots:
  val_y: maxboxacc_v2
"""


def ran(output: str) -> set[str]:
    """The stages a `dvc repro` ran, from its "Running stage 'NAME':" lines."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def store_counts(repo: Path) -> tuple[set[str], int]:
    with duckdb.connect(str(repo / "results" / "wsolbench.duckdb"), read_only=True) as con:
        folders = {"/".join(Path(row[0]).parts[-2:]) for row in con.execute("SELECT folder FROM runs").fetchall()}
        trials = con.execute("SELECT count(*) FROM optuna_trials").fetchone()[0]
    return folders, trials


def set_methods(repo: Path, methods: str) -> None:
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("methods: [cam, has]", f"methods: [{methods}]"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_pipeline_repo(tmp_path_factory.mktemp("pipeline"), TINY_PARAMS)


def test_repro_runs_every_stage_into_the_store_then_nothing(repo):
    output = dvc(repo, "repro")
    stages = ran(output)
    assert stages == {"prepare", "pretrain", "train@cam-none-0", "train@cam-mmd-0", "train@has-none-0",
                      "train@has-mmd-0", "tune", "best", "collect", "report"}, output
    folders, trials = store_counts(repo)
    assert folders == {"train/cam-none-0", "train/cam-mmd-0", "train/has-none-0", "train/has-mmd-0",
                       "best/cam-mmd-0"} and trials == 2
    best = json.loads((repo / "runs" / "tune" / "best.json").read_text())["best"]
    record = json.loads((repo / "runs" / "best" / "cam-mmd-0" / "metrics.json").read_text())
    assert (record["identity"]["lambda1"], record["identity"]["lambda2"]) == (best["lambda1"], best["lambda2"])
    # A completed run keeps its weights as final.pt, never last.pt (which a resume would continue).
    checkpoints = repo / "runs" / "train" / "cam-mmd-0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["final.pt"]
    # The report is the last stage: the page and its tables, of the store's 5 runs and 2 trials.
    report = repo / "results" / "report"
    runs_csv = (report / "runs.csv").read_text().splitlines()
    assert len(runs_csv) == 1 + 5 and len((report / "trials.csv").read_text().splitlines()) == 1 + 2
    assert "The embedded default (generated data)" in (report / "index.html").read_text()

    again = dvc(repo, "repro")
    assert ran(again) == set(), again
    assert "Data and pipelines are up to date." in dvc(repo, "status")

    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    shown = next(iter(metrics.values()))["data"]  # the workspace's (named "" before a first commit)
    assert {"runs/train/has-mmd-0/metrics.json", "runs/best/cam-mmd-0/metrics.json"} <= set(shown)
    assert shown["runs/train/has-mmd-0/metrics.json"]["data"]["maxboxacc_v2"] >= 0
    plots = dvc(repo, "plots", "show", "--json")
    assert "runs/train/cam-mmd-0/plots/val.json" in plots and "error" not in plots.lower(), plots


def test_a_new_method_runs_only_its_cells_and_a_killed_cell_resumes(repo):
    set_methods(repo, "cam, has, adl")
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=dvc_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        killed = None
        while killed is None and time.monotonic() < deadline and process.poll() is None:
            for cell in ("adl-none-0", "adl-mmd-0"):
                folder = repo / "runs" / "train" / cell
                if (folder / "checkpoints" / "last.pt").exists() and not (folder / "metrics.json").exists():
                    os.killpg(process.pid, signal.SIGKILL)  # dvc and the training under it, mid-run
                    killed = cell
                    break
            time.sleep(0.02)
    finally:
        if process.poll() is None and killed is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert killed is not None, "no adl cell was caught between its first epoch and its end"
    assert not (repo / "runs" / "train" / killed / "metrics.json").exists()

    output = dvc(repo, "repro")
    stages = ran(output)
    assert f"train@{killed}" in stages and "collect" in stages and "report" in stages, output
    assert stages <= {"train@adl-none-0", "train@adl-mmd-0", "collect", "report"}, output
    assert "resuming at epoch 2/2" in output, output
    history = json.loads((repo / "runs" / "train" / killed / "history.json").read_text())
    assert [entry["epoch"] for entry in history["train"]] == [1, 2]
    folders, _ = store_counts(repo)
    assert {"train/adl-none-0", "train/adl-mmd-0"} <= folders
    assert ran(dvc(repo, "repro")) == set()


def test_a_rerun_of_a_completed_cell_trains_from_the_first_epoch(repo):
    # As after a code change: DVC removes the cell's outputs but its persisted checkpoints/ (final.pt).
    output = dvc(repo, "repro", "--force", "--single-item", "train@cam-none-0")
    assert ran(output) == {"train@cam-none-0"}, output
    assert "resuming" not in output and "epoch 1/2" in output, output
    assert (repo / "runs" / "train" / "cam-none-0" / "metrics.json").is_file()


def test_experiments_take_params_on_the_command_line(repo):
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "the pipeline, run")  # experiments need a commit; repro does not
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    assert {"dvc.lock", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore"} <= set(tracked)
    assert not [name for name in tracked if name.startswith(("data/", "runs/", "results/"))]  # DVC's, not git's
    # The matrix shrinks to cells that are all up to date: the experiment records the params, runs collect.
    output = dvc(repo, "exp", "run", "-n", "baselines-only", "-S", "train.udas=[none]")
    assert ran(output) <= {"collect", "report"}, output
    shown = dvc(repo, "exp", "show", "--json")
    assert '"baselines-only"' in shown, shown


def test_the_training_matrix_runs_in_parallel_from_dvcs_experiment_queue_and_collects_into_one_store(repo):
    """Two slices of the matrix queued as experiments (DANN cells of CAM and of HAS, new to the
    repo), run by two queue workers at once; DVC's exp show holds both cells' metrics, and each
    experiment applied in turn and collected puts both runs into one store, with the same figures."""
    for method in ("cam", "has"):
        dvc(repo, "exp", "run", "--queue", "-n", f"queued-{method}-dann", "-S", f"train.methods=[{method}]",
            "-S", "train.udas=[dann]")
    dvc(repo, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    try:
        while True:
            status = dvc(repo, "queue", "status")
            if "Queued" not in status and "Running" not in status:
                break
            assert time.monotonic() < deadline, status
            time.sleep(3)
    finally:
        dvc(repo, "queue", "stop", "--kill", check=False)
    rows = {line.split()[1]: line.split()[-1] for line in status.splitlines() if line.startswith(tuple("0123456789abcdef"))}
    assert rows.get("queued-cam-dann") == rows.get("queued-has-dann") == "Success", status

    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    experiments = {rev["name"]: rev.get("data") or {} for commit in shown for exp in (commit.get("experiments") or [])
                   for rev in exp.get("revs") or [] if rev.get("name")}
    for method in ("cam", "has"):
        metrics = experiments[f"queued-{method}-dann"]["metrics"][f"runs/train/{method}-dann-0/metrics.json"]["data"]
        assert (metrics["method"], metrics["uda"]) == (method, "dann") and 0 <= metrics["maxboxacc_v2"] <= 100

    store = repo / "results" / "queued.duckdb"
    for method in ("cam", "has"):  # each experiment's run folders, applied in turn, into one store
        dvc(repo, "exp", "apply", f"queued-{method}-dann")
        done = subprocess.run(["wsolbench", "collect", "runs/train", "runs/best", "--store", str(store)], cwd=repo,
                              env=dvc_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    with duckdb.connect(str(store), read_only=True) as con:
        cells = {Path(row[0]).name: row[1] for row in con.execute(
            "SELECT folder, run_id FROM runs").fetchall()}
        metrics = dict(con.execute("SELECT r.run_id, m.value FROM runs r JOIN metrics m USING (run_id) "
                                   "WHERE m.metric = 'maxboxacc_v2' AND m.split = 'test'").fetchall())
    assert {"cam-dann-0", "has-dann-0"} <= set(cells), cells
    for method in ("cam", "has"):
        shown_value = experiments[f"queued-{method}-dann"]["metrics"][f"runs/train/{method}-dann-0/metrics.json"][
            "data"]["maxboxacc_v2"]
        assert metrics[cells[f"{method}-dann-0"]] == pytest.approx(shown_value)
