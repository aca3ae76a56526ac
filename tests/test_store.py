"""The store (`wsolbench collect`) and the comparison (`wsolbench runs`): known answers, idempotence,
replacement, skipped folders, the lock and schema errors, the paper's figures and their join.

Run folders are written through RunFolder as training writes them (no training), except one tiny
end-to-end run that checks a real run folder collects."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from wsolbench import store
from wsolbench.cli import main
from wsolbench.config import resolve_config
from wsolbench.errors import WsolbenchError

from run_folders import DA_LOGS, write_run

def tables(path: Path) -> dict[str, list[tuple]]:
    """Every table's rows, sorted: the store's whole content."""
    with duckdb.connect(str(path), read_only=True) as con:
        names = [n for (n,) in con.execute("SELECT table_name FROM information_schema.tables "
                                           "WHERE table_schema = 'main' AND table_type = 'BASE TABLE'").fetchall()]
        return {name: sorted(con.execute(f"SELECT * FROM {name}").fetchall(), key=repr) for name in names}


def query(path: Path, sql: str, *params) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def quiet(_line: str) -> None:
    pass


# ---- known answers -------------------------------------------------------------------------------

def test_mean_and_std_over_three_seeds_are_the_known_answer_with_the_papers_figure(tmp_path):
    for seed, pxap in enumerate([60.0, 62.0, 67.0]):
        write_run(tmp_path / "runs", f"mmd-s{seed}", uda="mmd", seed=seed, train_ms=18.0 + seed,
                  figures={"pxap": pxap, "piou": 45.0})
        write_run(tmp_path / "runs", f"cam-s{seed}", seed=seed, train_ms=10.0, figures={"pxap": 55.0, "piou": 40.0})
    # Another lambda pair is another setting: never averaged with the three seeds above.
    write_run(tmp_path / "runs", "mmd-other-lambda", uda="mmd", lambda1=1.4, figures={"pxap": 99.0, "piou": 99.0})
    store_path = tmp_path / "s.duckdb"
    summary = store.collect([tmp_path / "runs"], store_path, warn=quiet)
    assert (summary.added, summary.replaced, summary.unchanged, summary.skipped) == (7, 0, 0, [])

    rows = store.comparison_rows(store_path, uda="mmd")
    pxap = sorted((r for r in rows if r["metric"] == "pxap"), key=lambda r: r["lambda1"])
    assert [(r["lambda1"], r["n"], r["seeds"]) for r in pxap] == [(0.2, 3, [0, 1, 2]), (1.4, 1, [0])]
    three = pxap[0]
    assert three["mean"] == pytest.approx(63.0)
    assert three["std"] == pytest.approx(math.sqrt(13.0))  # sample std of 60, 62, 67
    assert (three["paper"], three["paper_table"]) == (65.42, 2)
    assert pxap[1]["mean"] == 99.0 and pxap[1]["std"] is None
    # Timings: the ratio to the same device's CAM baseline beside the paper's (25.25 / 13.84, Table 4).
    train = next(r for r in rows if r["metric"] == "train_ms_per_image" and r["n"] == 3)
    assert train["device"] == "NVIDIA H200"
    assert train["mean"] == pytest.approx(19.0) and train["ratio_to_cam"] == pytest.approx(1.9)
    assert train["paper"] == 25.25 and train["paper_ratio_to_cam"] == pytest.approx(25.25 / 13.84)


# ---- idempotence and replacement -----------------------------------------------------------------

def test_collecting_twice_adds_no_row_and_changes_no_value(tmp_path):
    for seed in range(2):
        write_run(tmp_path / "runs", f"a{seed}", uda="mmd", seed=seed)
        write_run(tmp_path / "runs", f"b{seed}", dataset="CUB", seed=seed)
    store_path = tmp_path / "s.duckdb"
    first = store.collect([tmp_path / "runs"], store_path, warn=quiet)
    before = tables(store_path)
    second = store.collect([tmp_path / "runs", tmp_path / "runs" / "a0"], store_path, warn=quiet)
    assert (first.added, second.added, second.replaced, second.unchanged) == (4, 0, 0, 4)
    assert tables(store_path) == before  # collected_at included: an unchanged run is not rewritten
    assert {name: len(rows) for name, rows in before.items()}["runs"] == 4
    assert len(before["history"]) > 0 and len(before["metrics"]) > 0 and len(before["timings"]) == 8
    assert not Path(str(store_path) + ".wal").exists()  # checkpointed: the file alone holds everything


def test_a_recollected_run_with_changed_metrics_replaces_its_rows(tmp_path):
    folder = write_run(tmp_path / "runs", "a", uda="mmd", epochs=3)
    write_run(tmp_path / "runs", "b", seed=1)
    store_path = tmp_path / "s.duckdb"
    store.collect([tmp_path / "runs"], store_path, warn=quiet)
    rid = folder.read_metrics()["run_id"]
    counts = {name: len(rows) for name, rows in tables(store_path).items()}

    metrics = folder.read_metrics()
    metrics["pxap"] = 70.5
    del metrics["piou"]
    folder.write_metrics(metrics)
    history = folder.read_history()
    folder.write_history(history["train"][:2], history["val"])
    summary = store.collect([tmp_path / "runs"], store_path, warn=quiet)

    assert (summary.added, summary.replaced, summary.unchanged) == (0, 1, 1)
    assert query(store_path, "SELECT metric, value FROM metrics WHERE run_id = ? ORDER BY metric", rid) == [
        ("pxap", 70.5), ("top1_cls", 70.0)]
    assert query(store_path, "SELECT max(epoch) FROM history WHERE run_id = ? AND phase = 'train'", rid) == [(2,)]
    after = {name: len(rows) for name, rows in tables(store_path).items()}
    assert after["runs"] == counts["runs"] and after["metrics"] == counts["metrics"] - 1
    assert after["history"] == counts["history"] - (len(DA_LOGS) + 4)  # one train epoch fewer


def test_a_replacement_that_fails_half_way_leaves_the_runs_old_rows(tmp_path, monkeypatch):
    folder = write_run(tmp_path / "runs", "a", uda="mmd")
    store_path = tmp_path / "s.duckdb"
    store.collect([tmp_path / "runs"], store_path, warn=quiet)
    before = tables(store_path)
    metrics = folder.read_metrics()
    folder.write_metrics({**metrics, "pxap": 70.5})
    real_insert = store._insert

    def insert_then_fail_at_timings(con, table, rows):
        if table == "timings":
            raise RuntimeError("killed half-way")
        real_insert(con, table, rows)

    monkeypatch.setattr(store, "_insert", insert_then_fail_at_timings)
    with pytest.raises(RuntimeError, match="killed half-way"):
        store.collect([tmp_path / "runs"], store_path, warn=quiet)
    assert tables(store_path) == before  # the delete and the inserts before the failure rolled back


def test_two_folders_of_one_run_id_keep_the_one_finished_last_and_name_the_other(tmp_path, capsys):
    old = write_run(tmp_path / "runs", "first", figures={"pxap": 50.0})
    new = write_run(tmp_path / "runs", "second", figures={"pxap": 51.0})
    os.utime(old.metrics, (1_000_000_000, 1_000_000_000))
    summary = store.collect([tmp_path / "runs"], tmp_path / "s.duckdb")
    assert summary.added == 1 and [p.name for p, _ in summary.skipped] == ["first"]
    assert f"skipped {old.path}: duplicate: run " in capsys.readouterr().err
    assert query(tmp_path / "s.duckdb", "SELECT folder FROM runs") == [(str(new.path),)]
    assert query(tmp_path / "s.duckdb", "SELECT value FROM metrics WHERE metric = 'pxap'") == [(51.0,)]


# ---- skipped folders -----------------------------------------------------------------------------

def test_partial_and_corrupt_folders_are_named_one_line_each_and_the_rest_collected(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "good")
    partial = write_run(runs, "killed", seed=1)
    partial.metrics.unlink()
    corrupt = write_run(runs, "corrupt", seed=2)
    corrupt.metrics.write_text('{\n  "run_id": \n}\n')
    mismatch = write_run(runs, "mismatch", seed=3)
    config = mismatch.read_config()
    mismatch.write_config({**config, "run_id": "f" * 16})
    history = write_run(runs, "bad-history", seed=4)
    history.history.write_text('{"train": {"epoch": 1}, "val": []}\n')
    typed = write_run(runs, "bad-seed", seed=5)
    metrics = typed.read_metrics()
    typed.write_metrics({**metrics, "identity": {**metrics["identity"], "seed": "five"}})

    assert main(["collect", str(runs), "--store", str(tmp_path / "s.duckdb"), "--pictures", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{tmp_path / 's.duckdb'}: runs 1 added, 0 replaced, 0 unchanged, 5 skipped"
    lines = err.strip().splitlines()
    assert len(lines) == 5
    assert f"skipped {typed.path}: corrupt: {typed.metrics}: identity.seed is 'five', expected int" in lines
    assert f"skipped {partial.path}: partial: no metrics.json (still running, or killed)" in lines
    assert f"skipped {corrupt.path}: corrupt: {corrupt.metrics}:3: not valid JSON (Expecting value, column 1)" in lines
    assert any(line.startswith(f"skipped {mismatch.path}: corrupt: config.json is run ffff") for line in lines)
    assert any(line.startswith(f"skipped {history.path}: corrupt: {history.history}: 'train' is not a list")
               for line in lines)
    assert query(tmp_path / "s.duckdb", "SELECT count(*), min(folder) FROM runs") == [(1, str(runs / "good"))]


def test_a_missing_root_writes_nothing(tmp_path, capsys):
    assert main(["collect", str(tmp_path / "nowhere"), "--store", str(tmp_path / "s.duckdb")]) == 2
    assert capsys.readouterr().err == f"wsolbench: error: {tmp_path / 'nowhere'}: no such folder of runs\n"
    assert not (tmp_path / "s.duckdb").exists()


# ---- the lock and the schema version -------------------------------------------------------------

def test_a_second_process_holding_the_store_gives_a_one_line_message_naming_the_file(tmp_path, capsys):
    write_run(tmp_path / "runs", "a")
    store_path = tmp_path / "s.duckdb"
    store.collect([tmp_path / "runs"], store_path, warn=quiet)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys\ncon = duckdb.connect(sys.argv[1])\nprint('open', flush=True)\n"
                               "sys.stdin.read()\n", str(store_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(WsolbenchError, match=rf"^{re.escape(str(store_path))}: the store is open in another "
                                                 rf"process \(PID {holder.pid}\); DuckDB lets one process write"):
            store.collect([tmp_path / "runs"], store_path, warn=quiet)
        for argv in (["collect", str(tmp_path / "runs")], ["runs"]):
            assert main([*argv, "--store", str(store_path)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"wsolbench: error: {store_path}: the store is open")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert store.collect([tmp_path / "runs"], store_path, warn=quiet).unchanged == 1  # free again


def test_a_store_of_a_newer_schema_or_not_a_store_is_refused_with_one_line(tmp_path, capsys):
    write_run(tmp_path / "runs", "a")
    store_path = tmp_path / "s.duckdb"
    store.collect([tmp_path / "runs"], store_path, warn=quiet)
    with duckdb.connect(str(store_path)) as con:
        con.execute("UPDATE schema_version SET version = ?, written_by = 'wsolbench 9.0'", [store.SCHEMA_VERSION + 1])
    before = tables(store_path)
    for argv in (["collect", str(tmp_path / "runs")], ["runs"]):
        assert main([*argv, "--store", str(store_path)]) == 2
        assert capsys.readouterr().err == (
            f"wsolbench: error: {store_path}: written by a newer wsolbench (wsolbench 9.0, store schema "
            f"{store.SCHEMA_VERSION + 1}); this wsolbench 0.1.0 reads schema {store.SCHEMA_VERSION} and older: "
            f"upgrade wsolbench, or collect into another store\n")
    assert tables(store_path) == before

    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(WsolbenchError, match=r"a DuckDB file, but not a wsolbench store"):
        store.collect([tmp_path / "runs"], other, warn=quiet)
    text = tmp_path / "notes.duckdb"
    text.write_text("not a database\n")
    with pytest.raises(WsolbenchError, match=rf"^{re.escape(str(text))}: "):
        store.comparison_rows(text)
    with pytest.raises(WsolbenchError, match=r"no store there \(create it with `wsolbench collect"):
        store.comparison_rows(tmp_path / "absent.duckdb")


def test_a_run_without_its_curves_is_collected_without_pictures_and_named(tmp_path, capsys):
    folder = write_run(tmp_path / "runs", "a")  # no curves.json, no score maps
    assert main(["collect", str(tmp_path / "runs"), "--store", str(tmp_path / "s.duckdb")]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("runs 1 added, 0 replaced, 0 unchanged, 0 skipped")
    assert err.strip() == (f"{folder.path}: collected without pictures (no curves.json (the optimal threshold "
                           f"comes from it))")
    assert query(tmp_path / "s.duckdb", "SELECT count(*) FROM sample_maps") == [(0,)]


def test_a_corrupt_curves_file_skips_its_run_naming_the_file_and_line(tmp_path, capsys):
    folder = write_run(tmp_path / "runs", "a")
    folder.curves.write_text('{\n  "kind": \n}\n')
    summary = store.collect([tmp_path / "runs"], tmp_path / "s.duckdb")
    assert summary.added == 0 and len(summary.skipped) == 1
    assert f"skipped {folder.path}: corrupt: {folder.curves}:3: not valid JSON" in capsys.readouterr().err


def test_collect_into_a_schema_1_store_adds_the_schema_2_tables_and_rereads_its_runs(tmp_path):
    write_run(tmp_path / "runs", "a")
    store_path = tmp_path / "s.duckdb"
    store.collect([tmp_path / "runs"], store_path, warn=quiet)
    with duckdb.connect(str(store_path)) as con:  # the layout schema 1 had
        for table in ("curves", "sample_images", "sample_maps"):
            con.execute(f"DROP TABLE {table}")
        con.execute("UPDATE schema_version SET version = 1")
    summary = store.collect([tmp_path / "runs"], store_path, warn=quiet)
    assert (summary.added, summary.replaced, summary.unchanged) == (0, 1, 0)
    assert query(store_path, "SELECT max(version) FROM schema_version") == [(2,)]
    assert {"curves", "sample_images", "sample_maps"} <= set(tables(store_path))
    assert store.collect([tmp_path / "runs"], store_path, warn=quiet).unchanged == 1


# ---- the paper's figures -------------------------------------------------------------------------

def markdown_tables(text: str) -> dict[int, list[list[str]]]:
    """Tables 1-4 of the paper markdown: their '|' rows as cells, separator rows left out."""
    lines = text.splitlines()
    found = {}
    for number in (1, 2, 3, 4):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"Table {number}."))
        rows = []
        for line in lines[start + 1:]:
            if line.startswith("|"):
                cells = [cell.strip() for cell in line.strip()[1:-1].split("|")]
                if not all(re.fullmatch(r":?-*:?", cell) for cell in cells):
                    rows.append(cells)
            elif rows:
                break
        found[number] = rows
    return found


def printed_cells(tables_: dict[int, list[list[str]]]) -> dict[tuple[int, str, str], str]:
    """(table, row label, column label) -> the figure as printed (bold and superscripts removed)."""
    def figure(cell: str) -> str:
        return re.sub(r"<sup>.*?</sup>|</?b>", "", cell).strip()

    cells = {}
    for number in (1, 2, 3):
        groups, heads = tables_[number][0], tables_[number][1]
        group = ""
        labels = []
        for j, head in enumerate(heads):
            group = groups[j] or group
            labels.append(f"{group} / {head}" if number != 3 or j >= 4 else head)
        for row in tables_[number][2:]:
            if number == 3:
                label = "+".join(name for name, mark in zip(("L_c", "L_d", "L_u", "TSA"), row) if mark == "✓")
                first = 4
            else:
                label, first = row[0], 1
            for j in range(first, len(row)):
                cells[number, label, labels[j]] = figure(row[j])
    method = ""
    for row in tables_[4][1:]:
        method = row[0] or method
        for head, cell in zip(tables_[4][0][2:], row[2:]):
            cells[4, f"{method} / {row[1]}", head] = figure(cell)
    return {key: value for key, value in cells.items() if value != "-"}


def test_the_paper_file_holds_every_figure_of_tables_1_to_4_as_printed(shared_dir):
    printed = printed_cells(markdown_tables((shared_dir / "paper" / "DA-WSOL-CVPR2022.md").read_text("utf-8")))
    transcribed = {(int(r["table"]), r["row"], r["column"]): r["value"] for r in store.read_paper_figures()}
    assert transcribed == printed
    # A handful of cells, by hand: bold, superscripts, the two-stage row, the ablations, a timing.
    assert printed[1, "Ours", "ImageNet dataset / GT-known"] == "70.27"
    assert printed[1, "Ours*", "ImageNet dataset / Top-1 Loc"] == "55.84"
    assert printed[2, "Ours", "InceptionV3 / PxAP"] == "64.46"
    assert printed[3, "L_c+L_d", "DANN / pIoU"] == "43.29"
    assert printed[4, "CAM / MMD", "PxAP"] == "65.42"
    assert printed[4, "ADL / DANN", "Train"] == "16.90"
    assert printed[4, "CutMix / -", "PxAP"] == "60.64" and printed[2, "CutMix [27]", "ResNet50 / PxAP"] == "57.57"


def test_the_paper_file_speaks_the_metric_vocabulary_with_one_figure_per_key_and_table():
    rows = store.read_paper_figures()
    assert len(rows) == 197
    assert {r["metric"] for r in rows} <= set(store.METRICS)
    assert {r["uda"] for r in rows} == {"none", "mmd", "dann"}
    assert {r["dataset"] for r in rows} == set(store.BENCHMARK_DATASETS)
    assert {r["backbone"] for r in rows} == {"resnet50", "inception_v3"}
    keys = [(r["table"], r["method"], r["uda"], r["variant"], r["dataset"], r["backbone"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert all(re.fullmatch(r"\d+\.\d\d", r["value"]) for r in rows)  # the digits as printed, "65.80" not "65.8"
    ours = {(r["table"], r["dataset"], r["metric"]): r["value"] for r in rows
            if (r["method"], r["uda"], r["variant"], r["backbone"]) == ("cam", "mmd", "", "resnet50")}
    assert ours["1", "ILSVRC", "top1_loc"] == "43.26" and ours["2", "OpenImages", "piou"] == "49.68"


def test_the_embedded_dataset_names_are_the_generators():
    from wsolbench.datasets import synthetic

    assert store.EMBEDDED_DATASETS == (synthetic.BOXES_DATASET, synthetic.MASKS_DATASET, synthetic.SOURCE_DATASET)


# ---- the comparison view -------------------------------------------------------------------------

def test_the_comparison_view_joins_the_papers_figure_for_the_papers_datasets_only(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "oi-mmd", uda="mmd")
    write_run(runs, "oi-no-lu", uda="mmd", use_universum_loss=False)
    write_run(runs, "oi-cutmix", method="cutmix")
    write_run(runs, "oi-inception", uda="mmd", backbone="inception_v3")
    write_run(runs, "synthetic-mmd", dataset="SyntheticMasks", uda="mmd", backbone="resnet50")
    write_run(runs, "cub-vgg", dataset="CUB", backbone="vgg16")
    store_path = tmp_path / "s.duckdb"
    store.collect([runs], store_path, warn=quiet)
    joined = {(folder.rsplit("/", 1)[-1], metric): (kind, paper, table)
              for folder, metric, kind, paper, table in query(
                  store_path, "SELECT r.folder, c.metric, c.dataset_kind, c.paper_value, c.paper_table "
                              "FROM comparison c JOIN runs r USING (run_id)")}
    assert joined["oi-mmd", "pxap"] == ("benchmark", 65.42, 2)
    assert joined["oi-mmd", "train_ms_per_image"] == ("benchmark", 25.25, 4)
    assert joined["oi-mmd", "top1_cls"] == ("benchmark", None, None)  # the paper has no such figure
    assert joined["oi-no-lu", "pxap"] == ("benchmark", 58.10, 3)  # Table 3: L_c + L_d + TSA, MMD
    assert joined["oi-cutmix", "pxap"] == ("benchmark", 57.57, 2)  # Table 2 before Table 4's 60.64
    assert joined["oi-inception", "piou"] == ("benchmark", 48.01, 2)
    assert joined["synthetic-mmd", "pxap"] == ("embedded", None, None)
    assert joined["cub-vgg", "maxboxacc_v2"] == ("benchmark", None, None)
    assert query(store_path, "SELECT printed FROM paper_reference WHERE method = 'cutmix' AND uda = 'none' "
                             "AND dataset = 'OpenImages' AND backbone = 'resnet50' AND metric = 'pxap'") == [
        ("Table 2: 57.57; Table 4: 60.64",)]
    assert query(store_path, "SELECT count(*) FROM comparison") == query(store_path, "SELECT count(*) FROM run_figures")


# ---- `wsolbench runs` ----------------------------------------------------------------------------

def test_runs_json_prints_one_array_of_the_comparison_rows_and_filters(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(2):
        write_run(runs, f"oi-{seed}", uda="mmd", seed=seed, figures={"pxap": 64.0 + 2 * seed, "piou": 48.0})
        write_run(runs, f"syn-{seed}", dataset="SyntheticBoxes", backbone="resnet18", seed=seed, gpu=None)
    store_path = str(tmp_path / "s.duckdb")
    assert main(["collect", str(runs), "--store", store_path]) == 0
    capsys.readouterr()

    assert main(["runs", "--store", store_path, "--dataset", "OpenImages", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and [r["metric"] for r in rows] == ["pxap", "piou", "train_ms_per_image",
                                                                      "test_ms_per_image"]
    assert set(rows[0]) == set(store.COMPARISON_COLUMNS)
    assert {k: rows[0][k] for k in ("dataset_kind", "method", "uda", "variant", "n", "seeds", "mean", "std", "paper",
                                    "paper_table")} == {
        "dataset_kind": "benchmark", "method": "cam", "uda": "mmd", "variant": "", "n": 2, "seeds": [0, 1],
        "mean": 65.0, "std": pytest.approx(math.sqrt(2.0)), "paper": 65.42, "paper_table": 2}

    assert main(["runs", "--store", store_path, "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["dataset"] for r in table} == {"OpenImages", "SyntheticBoxes"}
    assert {r["seeds"] for r in table} == {"0 1"}

    assert main(["runs", "--store", store_path, "--dataset", "SyntheticBoxes"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("SyntheticBoxes")]
    assert len(lines) == 10 and all("n/a (embedded default)" in line for line in lines)
    assert "maxboxacc_v2_iou70" in text and "cpu (2 threads)" in text
    assert "not comparable to the paper's CUB/ILSVRC/OpenImages figures" in text


# ---- Optuna trials -------------------------------------------------------------------------------

def test_optuna_trials_are_collected_with_their_run_and_replaced_not_repeated(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = write_run(tmp_path / "runs", "trial-0", uda="mmd")
    journal = tmp_path / "tune.journal"
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    study = optuna.create_study(study_name="oi-lambdas", storage=optuna.storages.JournalStorage(backend),
                                direction="maximize")
    study.enqueue_trial({"lambda1": 0.2, "lambda2": 3.0})
    trial = study.ask()
    trial.suggest_float("lambda1", 0.0, 2.0)
    trial.suggest_float("lambda2", 0.0, 5.0)
    trial.set_user_attr("run_folder", str(folder.path))
    study.tell(trial, 65.5)
    running = study.ask({"lambda1": optuna.distributions.FloatDistribution(0.0, 2.0)})

    store_path = tmp_path / "s.duckdb"
    summary = store.collect([tmp_path / "runs"], store_path, optuna_storage=str(journal), warn=quiet)
    assert (summary.studies, summary.trials) == (1, 2)
    assert "; 2 Optuna trials from 1 study" in summary.line()
    rows = query(store_path, "SELECT study, trial_number, state, lambda1, lambda2, value, run_id, "
                             "datetime_complete IS NOT NULL FROM optuna_trials ORDER BY trial_number")
    assert rows == [("oi-lambdas", 0, "COMPLETE", 0.2, 3.0, 65.5, folder.read_metrics()["run_id"], True),
                    ("oi-lambdas", 1, "RUNNING", running.params["lambda1"], None, None, None, False)]
    study.tell(running, 60.0)
    store.collect([tmp_path / "runs"], store_path, optuna_storage=f"journal:{journal}", warn=quiet)
    assert query(store_path, "SELECT count(*), count(value) FROM optuna_trials") == [(2, 2)]

    with pytest.raises(WsolbenchError, match=r"^--optuna-storage sqlite:///.*absent.db: no such SQLite file$"):
        store.collect([tmp_path / "runs"], tmp_path / "new.duckdb", optuna_storage=f"sqlite:///{tmp_path}/absent.db")
    assert not (tmp_path / "new.duckdb").exists()


# ---- one real run folder -------------------------------------------------------------------------

def test_a_trained_run_folder_collects_with_its_da_wsol_logs(tmp_path):
    from wsolbench.datasets import synthetic
    from wsolbench.experiment import train_and_evaluate

    data = tmp_path / "data"
    synthetic.generate(data, seed=3, num_classes=3, train_per_class=4, val_per_class=2, test_per_class=2,
                       source_classes=0)
    config = resolve_config(dict(
        dataset="SyntheticBoxes", data_root=str(data / "images"), metadata_root=str(data / "metadata"),
        mask_root=str(data / "masks"), image_size=64, epochs=1, batch_size=6, eval_batch_size=6, workers=0, lr=0.01,
        device="cpu", seed=1, out=str(tmp_path / "runs" / "cam-mmd"), uda="mmd", source_samples=4, target_samples=4,
        start_epoch=-1, pretrained="none", save_scoremaps=False))
    metrics = train_and_evaluate(config, log=quiet)
    store_path = tmp_path / "s.duckdb"
    assert store.collect([tmp_path / "runs"], store_path, warn=quiet).added == 1
    assert query(store_path, "SELECT run_id, dataset_kind, method, uda, seed FROM runs") == [
        (metrics["run_id"], "embedded", "cam", "mmd", 1)]
    keys = {key for (key,) in query(store_path, "SELECT DISTINCT key FROM history WHERE phase = 'train'")}
    assert set(DA_LOGS) <= keys and {"loss", "lr", "train_top1", "train_ms_per_image"} <= keys
    stored = dict(query(store_path, "SELECT metric, value FROM metrics WHERE split = 'test'"))
    assert stored["maxboxacc_v2"] == pytest.approx(metrics["maxboxacc_v2"])
    assert {"maxboxacc_v2_iou30", "maxboxacc_v2_iou50", "maxboxacc_v2_iou70", "gt_known_loc"} <= set(stored)
    device = f"cpu ({metrics['environment']['cpu_threads']} threads)"
    assert query(store_path, "SELECT kind, measure, ms_per_image, device FROM timings ORDER BY kind") == [
        ("test", "end_to_end", pytest.approx(metrics["test_ms_per_image"]), device),
        ("train", "end_to_end", pytest.approx(metrics["train_ms_per_image"]), device)]
