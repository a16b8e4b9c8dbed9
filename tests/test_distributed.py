"""Training under torchrun: N processes train the model one process trains (up to the order of reductions), a
restarted worker group continues its run by itself, and one process alone is as before."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, write_idx_dataset
from vitscope.distributed import Distributed
from vitscope.train import default_out

# A tiny model on the seed recipe, with every augmentation on: each process augments its share of a batch.
TINY_RECIPE = """
[model]
dim = 16
depth = 1
heads = 2
mlp_dim = 32
[train]
augment_rotate = 10.0
augment_scale = 0.1
augment_stroke = 0.5
augment_close = 1
"""
# 512 training images in batches of 32: 16 steps an epoch; 101 test images, which 2 processes cannot split evenly.
TRAIN_FLAGS = ["--preset", "seed", "--epochs", "6", "--batch-size", "32", "--no-progress", "--seed", "1"]
# What 2 processes may differ from 1 by (README, "Training on several processes"): the order of reductions only.
WEIGHT_TOLERANCE = 1e-5  # max |difference| of any weight but the attention's key bias, after 96 steps
METRIC_TOLERANCE = 1e-4  # of the losses in metrics.jsonl


def torchrun(nproc: int, *args, max_restarts: int = 0, timeout: int = 300, popen: bool = False):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "--max-restarts", str(max_restarts), "-m", "vitscope", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, env=env)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "tiny.toml").write_text(TINY_RECIPE)
    data = write_idx_dataset(folder / "idx", n_train=512, n_test=101)
    return folder, ["train", *TRAIN_FLAGS, "--config", folder / "tiny.toml", "--dataset", "idx", "--data-dir", data]


@pytest.fixture(scope="module")
def two_process_run(setting):
    folder, args = setting
    p = torchrun(2, *args, "--out", folder / "two")
    assert p.returncode == 0, p.stdout + p.stderr
    return folder / "two", p.stdout


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")} for row in rows]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_the_model_one_process_trains(setting, two_process_run):
    folder, args = setting
    two, log = two_process_run
    assert "2 processes (DistributedDataParallel, gloo; 16 images of each batch of 32 per process)" in log
    one = folder / "one"
    p = run_cli(*args, "--out", one)
    assert p.returncode == 0, p.stderr
    record = json.loads((two / "config.json").read_text())
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["backend"] == "gloo"
    assert json.loads((one / "config.json").read_text())["distributed"] == {"world_size": 1}

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for name in a:
        difference = (a[name] - b[name]).abs()
        if name.endswith("attn.qkv.bias"):
            # Softmax ignores the key bias (it adds one constant to every score of a query): its gradient is rounding
            # noise, which Adam scales up to steps of the learning rate's size, so only the query and value biases
            # are compared.
            difference = difference.view(3, -1)[[0, 2]]
        assert difference.max() <= WEIGHT_TOLERANCE, (name, difference.max().item())
    assert any(not torch.equal(a[name], b[name]) for name in a)  # two processes really did reduce differently
    for row_one, row_two in zip(metrics(one), metrics(two), strict=True):
        for key in ("train_loss", "test_loss"):
            assert abs(row_one[key] - row_two[key]) <= METRIC_TOLERANCE, (key, row_one, row_two)
        for key in ("epoch", "lr", "train_acc", "test_acc"):
            assert row_one[key] == row_two[key], (key, row_one, row_two)


def test_evaluation_covers_the_test_set_exactly_once_and_eval_agrees(two_process_run):
    two, _ = two_process_run
    p = run_cli("eval", two, "--json")  # one process, the whole test set
    assert p.returncode == 0, p.stderr
    result, last = json.loads(p.stdout), metrics(two)[-1]
    assert result["n"] == 101
    assert result["test_acc"] == last["test_acc"]  # 50 + 51 images scored by the two processes, none twice
    assert abs(result["test_loss"] - last["test_loss"]) < 1e-6


def worker_processes(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (its children), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if parent == torchrun_pid:
            ranks = [item[5:] for item in environ if item.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0])] = int(entry.name)
    return found


@pytest.mark.slow  # two torchrun launches of 2 processes each (~25 s on 2 cores)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_worker_group_torchrun_restarts_continues_the_run_and_ends_as_an_uninterrupted_one(setting,
                                                                                            two_process_run):
    folder, args = setting
    two, _ = two_process_run
    run = folder / "restarted"
    process = torchrun(2, *args, "--out", run, "--checkpoint-every", "4", max_restarts=1, popen=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint" / "state.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = worker_processes(process.pid)
    assert 1 in workers, "the run ended before its first checkpoint could be awaited"
    os.kill(workers[1], signal.SIGKILL)  # rank 1 dies at once; torchrun stops rank 0 and starts the group again
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "torchrun restart 1: continuing" in output, output
    a, b = load_file(str(two / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert comparable(metrics(run)) == comparable(metrics(two))  # no row lost or written twice


def test_one_process_is_a_world_of_one_and_every_collective_is_the_identity(monkeypatch):
    world = Distributed.from_environment({})
    assert (world.rank, world.world_size, world.is_main, world.backend) == (0, 1, True, None)
    assert world.share(10) == slice(0, 10)
    tensor = torch.arange(3.0)
    assert world.sum(tensor) is tensor and world.mean(tensor) is tensor and torch.equal(tensor, torch.arange(3.0))
    assert world.agree(2, 0) == [2, 0]
    assert world.gather(tensor).shape == (1, 3)
    assert world.broadcast_bytes(b"abc") == b"abc"
    assert world.threads_per_process() is None and world.wrap(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear


def test_shares_of_the_test_set_cover_it_once_for_any_number_of_processes():
    for world_size in (1, 2, 3, 7, 16):
        covered = [i for rank in range(world_size)
                   for i in range(101)[Distributed(rank, world_size).share(101)]]
        assert covered == list(range(101))


def test_processes_on_one_machine_share_its_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert Distributed(0, 4, 0, 4).threads_per_process() == 4
    assert Distributed(0, 2, 0, 2).threads_per_process() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert Distributed(0, 4, 0, 4).threads_per_process() == 1  # never 0


def test_the_default_run_directory_under_torchrun_is_one_a_restarted_group_finds_again():
    assert default_out("fast", {"TORCHELASTIC_RUN_ID": "a7ad06fe-1355"}) == Path("runs/fast-a7ad06fe-1355")
    assert default_out("fast", {"TORCHELASTIC_RUN_ID": "job/7"}) == Path("runs/fast-job_7")
    assert default_out("fast", {}).name.startswith("fast-20")


def test_a_batch_that_the_processes_cannot_share_equally_is_refused(setting):
    folder, args = setting
    p = torchrun(2, *args, "--batch-size", "33", "--out", folder / "odd")
    assert p.returncode != 0
    assert "batch size 33 is not divisible by the 2 processes" in p.stdout + p.stderr
