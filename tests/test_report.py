"""The report (`wsolbench report`): what each section says, from a store of real tiny runs (with
pictures and curves) and hand-written benchmark runs; the absent parts named; schema errors;
byte-stable and store-only rendering; atomic replacement; and the page in a real browser."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pytest

from wsolbench import store
from wsolbench.cli import main
from wsolbench.config import resolve_config
from wsolbench.reports import figures
from wsolbench.reports.report import REPORT_FILE, render_report

from run_folders import write_run

REPO = Path(__file__).resolve().parents[1]
# Screenshots of the browser test are kept here (git ignores it), whatever the test's outcome.
OUTPUT = Path(os.environ.get("WSOLBENCH_TEST_OUTPUT", REPO / "tests" / "output"))
PAPER_CAM_OPENIMAGES_PXAP = 58.19  # Table 2 (and 4), CAM, ResNet50
STUDY_TRIALS = [("COMPLETE", 0.5, 1.5, 55.0), ("COMPLETE", 0.1, 0.2, 40.0), ("PRUNED", 2.0, 5.0, 30.0)]


def quiet(_line: str) -> None:
    pass


class Page(HTMLParser):
    """The page's tables (class -> list of tables, each a list of rows of cell texts), images and
    headings, as a browser would see the DOM."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.images: list[dict[str, str]] = []
        self.headings: list[str] = []
        self._stack: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            table: list[list[str]] = []
            self.tables.setdefault(attrs.get("class", ""), []).append(table)
            self._stack.append(table)
        elif tag == "tr" and self._stack:
            self._stack[-1].append([])
        elif tag in ("td", "th") and self._stack:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag in ("h2", "h3"):
            self._heading = []

    def handle_endtag(self, tag):
        if tag == "table" and self._stack:
            self._stack.pop()
        elif tag in ("td", "th") and self._cell is not None and self._stack:
            self._stack[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag in ("h2", "h3") and self._heading is not None:
            self.headings.append(" ".join("".join(self._heading).split()))
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._heading is not None:
            self._heading.append(data)


def decoded_size(uri: str) -> tuple[int, int]:
    from PIL import Image

    kind, _, data = uri.partition(";base64,")
    assert kind in ("data:image/png", "data:image/jpeg"), uri[:40]
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        image.load()
        return image.size


# ---- a store of real tiny runs, a study and benchmark runs ---------------------------------------

def _train(data: Path, out: Path, dataset: str = "SyntheticBoxes", **settings) -> dict:
    from wsolbench.experiment import train_and_evaluate

    config = resolve_config(dict(
        dataset=dataset, data_root=str(data / "images"), metadata_root=str(data / "metadata"),
        mask_root=str(data / "masks"), image_size=64, epochs=2, batch_size=6, eval_batch_size=6, workers=0, lr=0.01,
        device="cpu", out=str(out), source_samples=4, target_samples=4, start_epoch=-1, pretrained="none",
        eval_frequency=1, **settings))
    return train_and_evaluate(config, log=quiet)


def _study(storage: str) -> None:
    import optuna
    from optuna.distributions import FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="lambda-SyntheticBoxes-cam-mmd", storage=storage, direction="maximize")
    space = {"lambda1": FloatDistribution(0.03, 3.0, log=True), "lambda2": FloatDistribution(0.1, 10.0, log=True)}
    for state, lambda1, lambda2, value in STUDY_TRIALS:
        # A pruned trial has no value, only the last figure it reported.
        study.add_trial(optuna.trial.create_trial(
            state=getattr(optuna.trial.TrialState, state), params={"lambda1": lambda1, "lambda2": lambda2},
            distributions=space, value=value if state == "COMPLETE" else None, intermediate_values={1: value},
            user_attrs={"objective": "maxboxacc_v2"}))


@pytest.fixture(scope="module")
def one_thread(torch_threads):
    """Small tensors: 1 torch thread (conftest.torch_threads)."""
    yield from torch_threads(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    from wsolbench.datasets import synthetic

    root = tmp_path_factory.mktemp("report")
    cwd = os.getcwd()
    os.chdir(root)  # run folders and data with relative paths, as the pipeline writes them
    try:
        data = Path("data")
        synthetic.generate(data, seed=3, num_classes=4, train_per_class=4, val_per_class=2, test_per_class=3,
                           source_classes=0)
        runs = {
            "cam-none-0": _train(data, Path("runs/train/cam-none-0"), seed=0),
            "cam-none-1": _train(data, Path("runs/train/cam-none-1"), seed=1),
            "cam-mmd-0": _train(data, Path("runs/train/cam-mmd-0"), seed=0, uda="mmd", lambda1=0.5, lambda2=1.5),
            "masks-cam-none-0": _train(data, Path("runs/train/masks-cam-none-0"), dataset="SyntheticMasks", seed=0),
        }
        # Two runs on a paper dataset (hand-written folders: no curves or pictures), for the paper tables.
        write_run(Path("runs/bench"), "oi-cam", dataset="OpenImages", train_ms=10.0, test_ms=70.0)
        write_run(Path("runs/bench"), "oi-cam-mmd", dataset="OpenImages", uda="mmd", train_ms=20.0, test_ms=84.0,
                  figures={"pxap": 64.0, "piou": 48.0, "top1_cls": 71.0})
        storage = f"sqlite:///{root / 'study.db'}"
        _study(storage)
        store_path = root / "store.duckdb"
        summary = store.collect(["runs"], store_path, optuna_storage=storage, warn=quiet, pictures=3)
        assert summary.added == 6
        out = root / "report"
        report = render_report(store_path, out, log=quiet)
    finally:
        os.chdir(cwd)
    html = (out / REPORT_FILE).read_text(encoding="utf-8")
    return {"root": root, "store": store_path, "out": out, "html": html, "page": Page(html), "runs": runs,
            "report": report}


def _row_starting(table: list[list[str]], *cells: str) -> list[list[str]]:
    return [row for row in table if row[:len(cells)] == list(cells)]


def test_paper_rows_show_the_matching_benchmark_run_and_the_difference(built):
    tables = {int(h.split()[-1]): t for h, t in zip(
        [h for h in built["page"].headings if h.startswith("Table ")], built["page"].tables["paper-table"])}
    cam_pxap = [row for row in tables[2] if row[:5] == ["CAM [33]", "ResNet50 / PxAP", "OpenImages", "resnet50",
                                                        "PxAP"]]
    assert len(cam_pxap) == 1
    assert cam_pxap[0][5] == "58.19" and cam_pxap[0][8] == "60.00 (n=1)"
    assert cam_pxap[0][9] == f"{60.0 - PAPER_CAM_OPENIMAGES_PXAP:+.2f}"
    # Table 4's timing: CAM + MMD at 20 ms against CAM's 10 on one device is 2.00x; the paper's 1.82x.
    mmd_train = [row for row in tables[4] if row[0] == "CAM / MMD" and row[4] == "train ms/img"]
    assert len(mmd_train) == 1 and mmd_train[0][9] == "ratio to CAM 2.00x vs paper 1.82x"
    # A paper row with no run says so; the generated data is never beside a paper figure.
    assert any("no run in the store" in row for table in tables.values() for row in table)
    assert not any("Synthetic" in cell for table in tables.values() for row in table for cell in row)


def test_the_embedded_default_has_its_own_table_with_mean_std_over_seeds(built):
    table = built["page"].tables["embedded-table"][0]
    header = table[0]
    cam = _row_starting(table, "SyntheticBoxes", "resnet10_half", "cam")
    assert len(cam) == 1
    values = [built["runs"][name]["gt_known_loc"] for name in ("cam-none-0", "cam-none-1")]
    expected = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n=2)"
    assert cam[0][header.index("GT-known Loc")] == expected
    assert cam[0][header.index("seeds")] == "0, 1"
    masks = _row_starting(table, "SyntheticMasks", "resnet10_half", "cam")
    assert masks and masks[0][header.index("PxAP")] == f"{built['runs']['masks-cam-none-0']['pxap']:.2f} (n=1)"
    assert "not comparable" in built["html"]


def test_da_wsol_against_base_says_one_seed_cannot_be_called(built):
    headings = [h for h in built["page"].headings if h.startswith(("SyntheticBoxes, ", "OpenImages, ", "SyntheticMasks, "))
                and "on " not in h]
    blocks = dict(zip(headings, built["page"].tables["versus"]))
    header, *rows = blocks["SyntheticBoxes, resnet10_half (embedded default)"]
    assert len(rows) == 1 and rows[0][:3] == ["cam + MMD", "0.5 / 1.5", "cam"]
    difference = built["runs"]["cam-mmd-0"]["maxboxacc_v2"] - statistics.mean(
        built["runs"][name]["maxboxacc_v2"] for name in ("cam-none-0", "cam-none-1"))
    cell = rows[0][header.index("MaxBoxAccV2")]
    assert cell.startswith(f"{difference:+.2f}") and "one seed, n=1/2" in cell


def test_a_difference_beyond_the_seeds_spread_is_marked_and_one_within_is_not(tmp_path):
    # Base seeds 60, 62 (std 1.41); DA-WSOL seeds 66, 67 (std 0.71): +5.5 exceeds 2.12. Top-1: +0.5 within.
    for seed, (base, da) in enumerate([(60.0, 66.0), (62.0, 67.0)]):
        for uda, value, top1 in (("none", base, 70.0 + seed), ("mmd", da, 70.5 + seed)):
            write_run(tmp_path / "runs", f"{uda}-{seed}", dataset="CUB", uda=uda, seed=seed,
                      figures={"maxboxacc_v2": value, "top1_cls": top1})
    store.collect([tmp_path / "runs"], tmp_path / "s.duckdb", warn=quiet)
    render_report(tmp_path / "s.duckdb", tmp_path / "out", log=quiet)
    html = (tmp_path / "out" / REPORT_FILE).read_text()
    header, row = Page(html).tables["versus"][0]
    assert row[header.index("MaxBoxAccV2")] == "+5.50 (spread 2.12)exceeds, n=2/2"
    assert row[header.index("Top-1 Cls")] == "+0.50 (spread 1.41)within, n=2/2"
    assert '<td class="num exceeds">+5.50' in html and '<td class="num within">+0.50' in html


def test_timings_are_ratios_to_the_same_devices_cam(built):
    blocks = built["page"].tables["timings"]
    headings = [h for h in built["page"].headings if " on " in h and ("OpenImages" in h or "Synthetic" in h)]
    openimages = [t for h, t in zip(headings, blocks) if h.startswith("OpenImages")][0]
    mmd = _row_starting(openimages, "cam", "MMD")[0]
    assert mmd[3] == "0.2 / 3"  # OpenImages ResNet50's recipe λ (spec §6.2)
    assert mmd[5] == "2.00x" and mmd[6] == "1.82x" and mmd[8] == "1.20x" and mmd[9] == "1.02x"


def test_the_study_shows_its_best_pair_and_what_it_scored_on_test(built):
    html, page = built["html"], built["page"]
    assert "Best: trial 0, λ1 = 0.5, λ2 = 1.5, val 55.00." in html
    best = page.tables["best-on-test"][0]
    assert len(best) == 2 and best[1][0].startswith("cam + MMD (λ 0.5/1.5) s0")
    header = best[0]
    assert best[1][header.index("MaxBoxAccV2")] == f"{built['runs']['cam-mmd-0']['maxboxacc_v2']:.2f}"
    trials = page.tables["trials"][0]
    assert [row[1] for row in trials[1:]] == [state for state, *_ in STUDY_TRIALS]


def test_pictures_show_the_same_images_for_every_run_and_decode(built):
    page = built["page"]
    pictures = page.tables["pictures"]
    assert len(pictures) == 2  # SyntheticBoxes and SyntheticMasks
    boxes = pictures[0]
    assert len(boxes) == 1 + 3  # header + the three SyntheticBoxes runs
    assert all(len(row) == 1 + 3 for row in boxes)  # the run, then the 3 fixed images
    assert sum("IoU" in cell for row in boxes[1:] for cell in row[1:]) == 9
    sizes = [decoded_size(image["src"]) for image in page.images]
    assert sizes and all(width > 0 and height > 0 for width, height in sizes)
    assert sum(size == (160, 160) for size in sizes) == (3 + 3 * 3) + (3 + 3 * 1)  # headers + overlays


def test_the_stored_ground_truth_is_the_evaluators_rescaled_boxes(built):
    from wsolbench.datasets.metadata import read_split
    from wsolbench.evaluator import rescale_box

    metadata = read_split(built["root"] / "data" / "metadata", "SyntheticBoxes", "test")
    with duckdb.connect(str(built["store"]), read_only=True) as con:
        stored = con.execute("SELECT image_id, gt_boxes, eval_size FROM sample_images WHERE dataset = "
                             "'SyntheticBoxes'").fetchall()
    assert len(stored) == 3
    for image_id, boxes, size in stored:
        expected = [list(rescale_box(box, metadata.image_sizes[image_id], (size, size)))
                    for box in metadata.boxes[image_id]]
        assert json.loads(boxes) == expected and size == 64


def test_the_overlay_draws_the_ground_truth_and_the_predicted_box_where_they_are():
    import numpy as np
    from PIL import Image

    from wsolbench.samples import png_bytes

    sample = {"eval_size": 80, "width": 160, "height": 80, "gt_boxes": json.dumps([[10, 10, 50, 50]]),
              "gt_mask_png": None, "thumbnail_png": png_bytes(np.zeros((40, 80, 3), np.uint8))}
    picture = np.asarray(Image.open(io.BytesIO(figures.overlay_jpeg(sample, None, [40, 40, 60, 60], None, 80))))
    # GT (10, 10)-(50, 50) in the 80x80 evaluation frame: green there; the prediction red at 40-60.
    assert picture[10, 30, 1] > 150 and picture[10, 30, 0] < 100
    assert picture[60, 55, 0] > 150 and picture[60, 55, 1] < 100
    assert picture[30, 70].max() < 60  # nothing drawn elsewhere


def test_the_csv_tables_beside_the_page_hold_the_same_figures(built):
    out = built["out"]
    rows = list(csv.DictReader((out / "settings.csv").open()))
    cam = [r for r in rows if r["dataset"] == "SyntheticBoxes" and r["uda"] == "none" and r["metric"] == "gt_known_loc"]
    assert len(cam) == 1 and cam[0]["n"] == "2" and cam[0]["seeds"] == "0 1"
    assert float(cam[0]["mean"]) == pytest.approx(statistics.mean(
        built["runs"][name]["gt_known_loc"] for name in ("cam-none-0", "cam-none-1")))
    trials = list(csv.DictReader((out / "trials.csv").open()))
    assert [t["state"] for t in trials] == [state for state, *_ in STUDY_TRIALS]
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert len(runs) == 6 and all(r["run_id"] for r in runs)
    paper = list(csv.DictReader((out / "paper_tables.csv").open()))
    assert any(r["paper_table"] == "2" and r["metric"] == "pxap" and r["difference"] == "+1.81" for r in paper)


def test_the_report_reads_the_store_only_and_renders_the_same_bytes(built, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1800000000")
    first = render_report(built["store"], tmp_path / "a", log=quiet)
    # Without the run folders, the data, or the Optuna storage, the page is byte for byte the same.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("runs", "data", "study.db"):
        shutil.move(str(built["root"] / name), moved / name)
    try:
        render_report(built["store"], tmp_path / "b", log=quiet)
    finally:
        for name in ("runs", "data", "study.db"):
            shutil.move(str(moved / name), built["root"] / name)
    for name in ("index.html", "settings.csv", "paper_tables.csv", "timings.csv", "trials.csv", "runs.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first.runs == 6


def test_a_failed_render_leaves_the_previous_report_as_it_was(built, tmp_path, monkeypatch):
    out = tmp_path / "report"
    render_report(built["store"], out, log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(figures, "training_chart", broken)
    with pytest.raises(RuntimeError):
        render_report(built["store"], out, log=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging folder left


# ---- a store that lacks things ---------------------------------------------------------------------

def test_a_store_with_one_mask_run_no_study_no_timings_renders_and_names_what_is_absent(tmp_path):
    write_run(tmp_path / "runs", "one", dataset="SyntheticMasks", train_ms=None, test_ms=None)
    store.collect([tmp_path / "runs"], tmp_path / "s.duckdb", warn=quiet)
    summary = render_report(tmp_path / "s.duckdb", tmp_path / "out", log=quiet)
    page = Page((tmp_path / "out" / REPORT_FILE).read_text())
    absent = " | ".join(summary.sections_absent)
    for part in ("timings", "λ1/λ2 study", "pictures", "seed spread", "paper's datasets"):
        assert part in absent, part
    assert "No Optuna study in the store." in (tmp_path / "out" / REPORT_FILE).read_text()
    assert len(page.tables["embedded-table"][0]) == 2  # the header and the one run
    assert "pxap" in (tmp_path / "out" / "settings.csv").read_text()


def test_the_timing_gates_history_is_shown_across_commits(tmp_path):
    import datetime

    path = tmp_path / "s.duckdb"
    for k, (commit, ratio) in enumerate([("a" * 40, 2.0), ("b" * 40, 3.0)]):
        store.record_benchmarks(path, [
            {"commit": commit, "dirty": False, "machine": "CPU X, 2 CPUs, x86_64",
             "run_at": datetime.datetime(2026, 12, 3, 7, k), "benchmark": name, "median_s": median,
             "ratio": value, "baseline_ratio": 2.0 if value else None, "wsolbench_version": "0.1.0"}
            for name, median, value in (("evaluator_maxboxacc_v2", 0.04 * ratio / 2, ratio),
                                        ("calibration_first", 0.02, None))])
    summary = render_report(path, tmp_path / "out", log=quiet)
    assert not any("timing gate" in line for line in summary.sections_absent)
    page = Page((tmp_path / "out" / REPORT_FILE).read_text())
    header, row = page.tables["benchmarks"][0]
    assert row[:5] == ["evaluator_maxboxacc_v2", "60.00", "3.000", "2.000", "1.50x"]
    assert any("2 gate runs" in h for h in (tmp_path / "out" / REPORT_FILE).read_text().split("<h4>"))


def test_an_empty_store_renders_and_says_there_is_no_run(tmp_path):
    with store.open_store(tmp_path / "s.duckdb"):
        pass
    summary = render_report(tmp_path / "s.duckdb", tmp_path / "out", log=quiet)
    assert summary.runs == 0 and any("holds no run" in line for line in summary.sections_absent)


def test_a_schema_1_store_renders_without_pictures_and_says_why(tmp_path):
    write_run(tmp_path / "runs", "one", dataset="CUB", figures=None)
    path = tmp_path / "s.duckdb"
    store.collect([tmp_path / "runs"], path, warn=quiet)
    with duckdb.connect(str(path)) as con:  # what a schema-1 store holds: no curves or pictures
        for table in ("curves", "sample_images", "sample_maps"):
            con.execute(f"DROP TABLE {table}")
        con.execute("DELETE FROM schema_version WHERE version = 2")
        con.execute("INSERT INTO schema_version VALUES (1, 'wsolbench 0.1.0')")
    summary = render_report(path, tmp_path / "out", log=quiet)
    assert any("schema-1 store" in line for line in summary.sections_absent)


def test_a_store_of_a_newer_schema_is_refused_with_one_line_and_nothing_written(tmp_path, capsys):
    path = tmp_path / "s.duckdb"
    with store.open_store(path):
        pass
    with duckdb.connect(str(path)) as con:
        con.execute("INSERT INTO schema_version VALUES (99, 'wsolbench 9.0')")
    assert main(["report", "--store", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(path) in error[0] and "newer" in error[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_store_is_one_line_naming_it(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path / "none.duckdb"), "--out", str(tmp_path / "out")]) == 2
    assert "none.duckdb: no store there" in capsys.readouterr().err


# ---- in a real browser -----------------------------------------------------------------------------

def _browser():
    required = os.environ.get("WSOLBENCH_REQUIRE_BROWSER") == "1"  # set by .ci/run: CI must not skip this
    try:
        from selenium import webdriver
    except ImportError:
        if required:
            raise
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        message = "no chromium + chromedriver here (.ci/run installs Debian's chromium and chromium-driver)"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The drivers are given: Selenium Manager is never asked to download one.
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


@pytest.mark.parametrize("width, height, name", [(1440, 900, "desktop"), (1280, 720, "laptop")])
def test_the_page_loads_in_headless_chromium_with_every_table_filled_and_every_image_decoded(built, width, height,
                                                                                              name):
    driver = _browser()
    try:
        driver.set_window_size(width, height)
        driver.get((built["out"] / REPORT_FILE).as_uri())
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        rows = driver.execute_script("return Array.from(document.querySelectorAll('table')).map(t => t.rows.length)")
        assert rows and min(rows) >= 2, rows  # a header and at least one row in every table
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight, i.width])")
        assert len(images) == len(built["page"].images)
        assert all(w > 0 and h > 0 and shown > 0 for w, h, shown in images), images
        # Nothing is fetched: every resource is inline.
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
        full_height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(full_height + 200, 16000))
        OUTPUT.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(OUTPUT / f"report-{name}.png"))
    finally:
        driver.quit()
