"""Training under torchrun (issue 13): 2 CPU processes with the gloo backend against 1 process.

The process tests start the real launcher, `python -m torch.distributed.run --standalone`, as a user
would (`wsolbench train` itself, or tests/distributed_worker.py where a test must look inside the
ranks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsolbench.config import resolve_config
from wsolbench.datasets import synthetic
from wsolbench.datasets.images import WSOLImageDataset, train_transform
from wsolbench.datasets.metadata import read_split
from wsolbench.distributed import GlobalBatchSampler, ProcessGroup
from wsolbench.errors import WsolbenchError
from wsolbench.experiment import train_and_evaluate
from wsolbench.methods.dawsol.target_sample_assigner import TargetSampleAssigner

from distributed_worker import plain_data  # noqa: E402 (tests/ is on the path, as for every test module)

WORKER = Path(__file__).with_name("distributed_worker.py")
FIGURES = ("top1_cls", "top1_loc", "gt_known_loc", "maxboxacc", "maxboxacc_v2")


# --- the global batch and its shares (no processes) -------------------------------------------

def test_the_ranks_shares_make_up_the_single_process_batches_in_order():
    single = list(GlobalBatchSampler(15, 8, seed=5))
    assert [len(b) for b in single] == [8, 7] and sorted(sum(single, [])) == list(range(15))
    shares = [list(GlobalBatchSampler(15, 8, seed=5, group=ProcessGroup(rank, 2))) for rank in range(2)]
    assert [[len(b) for b in s] for s in shares] == [[4, 4], [4, 3]]  # the last batch's shares differ by one
    for step, batch in enumerate(single):
        assert shares[0][step] + shares[1][step] == batch  # contiguous, rank order: the global batch order
    sampler = GlobalBatchSampler(15, 8, seed=5, group=ProcessGroup(1, 2))
    assert [(s.images, s.global_images, s.loss_weight) for s in map(sampler.share_of, range(2))] == [
        (4, 8, 1.0), (3, 7, 2 * 3 / 7)]


def test_a_last_global_batch_smaller_than_the_world_is_left_out_on_every_rank():
    samplers = [GlobalBatchSampler(17, 8, seed=0, group=ProcessGroup(rank, 4)) for rank in range(4)]
    assert all(len(s) == 2 and s.dropped == 1 for s in samplers)  # 17 = 8 + 8 + 1 image for 4 ranks
    assert GlobalBatchSampler(17, 8, seed=0).dropped == 0


def test_a_batch_size_that_does_not_divide_across_the_processes_is_refused():
    with pytest.raises(WsolbenchError, match="--batch-size 30 is the global batch and must divide evenly across "
                                             "the 4 processes"):
        GlobalBatchSampler(100, 30, seed=0, group=ProcessGroup(0, 4))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "data"
    # 15 training images: with --batch-size 8 one epoch is 2 steps, the second split 4 + 3.
    synthetic.generate(root, seed=3, num_classes=3, train_per_class=5, val_per_class=3, test_per_class=3,
                       source_classes=0)
    return root


def test_an_images_augmentation_depends_on_the_epoch_seed_and_the_image_only(dataset):
    meta = read_split(dataset / "metadata", "SyntheticBoxes", "train")
    images = WSOLImageDataset(meta, dataset / "images", train_transform(64)).seeded(11)
    first = images[4][0]
    torch.manual_seed(123)  # whatever the process's stream, and whatever came before
    images[2]
    assert torch.equal(images[4][0], first)
    assert not torch.equal(images.seeded(12)[4][0], first)


# --- processes ---------------------------------------------------------------------------------

def torchrun(*args: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), *args], env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def worker(mode: str, tmp_path: Path, **arguments) -> Path:
    result = tmp_path / f"{mode}.result"
    argument_file = tmp_path / f"{mode}.json"
    argument_file.write_text(json.dumps({**arguments, "result": str(result)}))
    torchrun(str(WORKER), mode, str(argument_file))
    return result


def config_values(data: Path, out: Path, **overrides) -> dict:
    values = dict(dataset="SyntheticBoxes", data_root=str(data / "images"), metadata_root=str(data / "metadata"),
                  mask_root=str(data / "masks"), image_size=64, epochs=1, batch_size=8, eval_batch_size=4,
                  workers=0, eval_frequency=1, lr=0.01, optimizer="sgd", device="cpu", seed=1, out=str(out),
                  source_samples=4, target_samples=4, start_epoch=-1, pretrained="none")
    values.update(overrides)
    return values


def cli_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def test_cam_on_two_processes_matches_one_with_the_same_global_batch(dataset, tmp_path):
    """Tolerance: the weights after one epoch (2 steps, the second with shares 4 + 3) agree to 1e-5
    of each tensor's largest value, and the test figures to one image. The two runs do the same
    arithmetic except for the order of float32 sums: BN statistics and gradients are summed per
    share and then across ranks (about 1e-6 relative here). Not more steps: on this from-scratch
    miniature a 1e-6 relative change of the weights becomes a 4% change of some gradients two steps
    later (measured with one process, perturbing its weights), so bit-level agreement cannot be
    carried through a whole training run, only its statistics."""
    values = config_values(dataset, tmp_path / "unused")
    single = train_and_evaluate(resolve_config({**values, "out": str(tmp_path / "one")}), log=lambda _: None)
    done = torchrun("-m", "wsolbench", "train", "--quiet", *cli_flags({**values, "out": tmp_path / "two"}))
    assert "x 2 processes" in done.stdout and done.stdout.count("epoch 1/1") == 1  # rank 0 alone logs
    double = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = torch.load(tmp_path / "one" / "checkpoints" / "final.pt", weights_only=False)["trainer"]["model"]
    two = torch.load(tmp_path / "two" / "checkpoints" / "final.pt", weights_only=False)["trainer"]["model"]
    assert one.keys() == two.keys()  # the same checkpoint layout: a 2-process run resumes or scores anywhere
    for name, tensor in one.items():
        if tensor.is_floating_point():
            scale = float(tensor.abs().max()) or 1.0
            assert float((tensor - two[name]).abs().max()) <= 1e-5 * scale, name
    test_images = len(read_split(dataset / "metadata", "SyntheticBoxes", "test"))
    for key in FIGURES:
        assert abs(double[key] - single[key]) <= 100 / test_images + 1e-9, key
    assert double["environment"]["processes"] == 2 and single["environment"]["processes"] == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(list((tmp_path / "two" / "scoremaps" / "test").rglob("*.npy"))) == test_images  # every rank's maps


@pytest.mark.parametrize("dataset_name", ["SyntheticBoxes", "SyntheticMasks"])  # box counts; PxAP histograms
def test_val_and_test_scored_in_shares_give_exactly_the_single_process_figures(dataset, tmp_path, dataset_name):
    values = config_values(dataset, tmp_path / "run", eval_batch_size=2, dataset=dataset_name)
    train_and_evaluate(resolve_config(values), log=lambda _: None)
    checkpoint = tmp_path / "run" / "checkpoints" / "final.pt"
    from wsolbench.experiment import Run, figures_of
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the maps' last bits, which PxAP's histograms see, depend on it
    try:
        compare_scoring(values, checkpoint, tmp_path)
    finally:
        torch.set_num_threads(threads)


def compare_scoring(values, checkpoint, tmp_path):
    from wsolbench.experiment import Run, figures_of
    run = Run(resolve_config({**values, "out": str(tmp_path / "score")}), lambda _: None)
    run.trainer.load_state_dict(torch.load(checkpoint, weights_only=False)["trainer"])
    sharded = json.loads(worker("score", tmp_path, config={**values, "out": str(tmp_path / "score")},
                                checkpoint=str(checkpoint)).read_text())
    for name, split in (("val", run.val_set), ("test", run.test_set)):
        result, predictions, _ = run.score(split)
        assert sharded[name]["figures"] == json.loads(json.dumps(figures_of(result))), name  # exact
        assert sharded[name]["predictions"] == predictions
        assert sharded[name]["curves"] == json.loads(json.dumps(plain_data(result.curves()))), name


def test_the_target_sample_assigner_on_two_ranks_is_the_sequential_assigner_on_the_global_batch(tmp_path):
    """Exact: the same anchors, counts and generator on both ranks after every batch, equal to one
    process's on the whole batches, and the ranks' samples together are the single process's."""
    generator = torch.Generator().manual_seed(0)
    num_classes, channels = 4, 16
    batches = []
    for size in (8, 7, 8):  # 7: shares of 4 and 3
        features = torch.rand(size, channels, 5, 5, generator=generator)
        features[:, :, :2] *= 0.1  # a darker band, so that clusters differ
        labels = torch.randint(0, num_classes, (size,), generator=generator)
        labels[1] = labels[0]  # a class met twice in one batch, across the shares in the 7-image one
        batches.append((features, labels))
    torch.save(batches, tmp_path / "batches.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1): CPU matmul sums depend on it
    try:
        compare_assigners(batches, num_classes, channels, tmp_path)
    finally:
        torch.set_num_threads(threads)


def compare_assigners(batches, num_classes, channels, tmp_path):
    for engine in ("per_image", "speculative"):
        record = torch.load(worker("tsa", tmp_path, batches=str(tmp_path / "batches.pt"), num_classes=num_classes,
                                   channels=channels, engine=engine), weights_only=False)
        reference = TargetSampleAssigner(num_classes, channels, source_samples=4, target_samples=4, seed=7,
                                         sequential_engine=engine)
        for (features, labels), step in zip(batches, record):
            samples = reference.assign(features, features.mean(dim=(2, 3)), labels)
            state = reference.state_dict()
            for rank_state in step["states"]:
                for key, value in state.items():
                    assert torch.equal(torch.as_tensor(rank_state[key]), torch.as_tensor(value)), (engine, key)
            parts = step["samples"]
            assert torch.equal(torch.cat([p["source"] for p in parts]), samples.source.detach())
            assert torch.equal(torch.cat([p["target"] for p in parts]), samples.target.detach())
            assert torch.equal(torch.cat([p["universum"] for p in parts]), samples.universum.detach())
            assert torch.equal(torch.cat([p["valid"] for p in parts]), samples.valid_images)
            assert all(p["batch_valid"] == samples.valid_count for p in parts)
            assert all(p["batch_universum"] == samples.universum.shape[0] for p in parts)
        assert samples.valid_count > 0 and samples.universum.shape[0] > 0  # the test exercised both


def test_dawsol_on_two_ranks_keeps_the_anchors_identical_after_every_step_and_trains(dataset, tmp_path):
    values = config_values(dataset, tmp_path / "anchors", uda="mmd", epochs=2)
    result = json.loads(worker("anchors", tmp_path, config=values).read_text())
    steps = result["steps"]
    assert len(steps) == 4 and all(step["same_state"] for step in steps)
    assert steps[-1]["anchor_updates"] > steps[0]["anchor_updates"] > 0  # the TSA ran on every step
    assert all(0 < step["logs"]["valid_share"] <= 1 for step in steps)
    for key in FIGURES:
        assert 0.0 <= result["figures"][key] <= 100.0, key


def test_every_method_with_and_without_dawsol_trains_under_ddp_with_the_ranks_in_step(dataset, tmp_path):
    """Two epochs each, the first a DA-WSOL warm-up (DANN's domain classifier unused there): the
    ranks' weights, BN statistics and assigner states are identical after every epoch."""
    methods = ("cam", "has", "acol", "spg", "adl", "cutmix")
    cases = [[method, uda] for method in methods for uda in ("none", "mmd", "dann")]
    values = config_values(dataset, tmp_path / "unused", epochs=2, start_epoch=0, cam_curve_interval=0.01)
    result = json.loads(worker("matrix", tmp_path, cases=cases, config=values).read_text())
    assert [[case["method"], case["uda"]] for case in result] == cases
    for case in result:
        name = f"{case['method']}+{case['uda']}"
        assert case["same_after_each_epoch"] == [True, True], name
        assert case["loss"] == case["loss"] and case["loss"] > 0, name  # finite
        if case["uda"] != "none":
            assert "L_d" in case["logs"], name  # DA-WSOL trained in the second epoch


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_runs_metrics(dataset, tmp_path):
    values = config_values(dataset, tmp_path / "killed", uda="mmd", epochs=2, start_epoch=0)
    argument_file = tmp_path / "kill.json"
    argument_file.write_text(json.dumps({"config": values}))
    killed = torchrun(str(WORKER), "killed-after-first-epoch", str(argument_file), check=False)
    assert killed.returncode != 0
    assert (tmp_path / "killed" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "killed" / "metrics.json").exists()
    torchrun("-m", "wsolbench", "train", "--quiet", "--resume", *cli_flags(values))
    torchrun("-m", "wsolbench", "train", "--quiet", *cli_flags({**values, "out": tmp_path / "whole"}))
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    for key in FIGURES:
        assert resumed[key] == whole[key], key


def test_two_hosts_by_torchruns_rendezvous_train_as_two_local_processes_do(dataset, tmp_path):
    """Two launchers, one process each, meeting at a c10d rendezvous as two hosts would. The second
    "host" works in another directory, so its relative --out is a folder it never sees written:
    only rank 0 touches the run folder, and the result is bit for bit the one-host 2-process run's."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    values = {**config_values(dataset, Path("run")), "uda": "mmd"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    hosts = []
    for node in range(2):
        (tmp_path / f"host{node}").mkdir()
        hosts.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "wsolbench-test",
             "-m", "wsolbench", "train", "--quiet", *cli_flags(values)],
            cwd=tmp_path / f"host{node}", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [host.communicate(timeout=600)[0] for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0], outputs
    written = [tmp_path / f"host{node}" / "run" for node in range(2) if (tmp_path / f"host{node}" / "run").exists()]
    assert len(written) == 1 and (written[0] / "metrics.json").exists()  # rank 0's host alone
    torchrun("-m", "wsolbench", "train", "--quiet", *cli_flags({**values, "out": tmp_path / "one-host"}))
    one_host = json.loads((tmp_path / "one-host" / "metrics.json").read_text())
    two_hosts = json.loads((written[0] / "metrics.json").read_text())
    for key in FIGURES:
        assert two_hosts[key] == one_host[key], key
    weights = [torch.load(folder / "checkpoints" / "final.pt", weights_only=False)["trainer"]["model"]
               for folder in (written[0], tmp_path / "one-host")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_other_subcommands_under_torchrun_are_refused_in_one_line(tmp_path):
    done = torchrun("-m", "wsolbench", "prepare", "synthetic", "--out", str(tmp_path / "data"), check=False)
    assert done.returncode != 0
    assert ("wsolbench: error: `wsolbench prepare` runs as one process; of the subcommands only `train` runs "
            "under torchrun (WORLD_SIZE=2)") in done.stderr
    assert not (tmp_path / "data").exists()


def test_a_batch_size_that_does_not_divide_is_refused_before_the_run_folder_is_written(dataset, tmp_path):
    values = config_values(dataset, tmp_path / "run", batch_size=7)
    done = torchrun("-m", "wsolbench", "train", "--quiet", *cli_flags(values), check=False)
    assert done.returncode != 0
    assert ("wsolbench: error: --batch-size 7 is the global batch and must divide evenly across the 2 processes"
            in done.stderr)
    assert not (tmp_path / "run").exists()
