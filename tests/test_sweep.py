"""`vitscope sweep`: trials judged on a validation split of the training images, a killed sweep that finishes the
very trials an uninterrupted one does, pruning, and a best.toml that `vitscope train --config` takes."""
import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest
import torch

from conftest import run_cli, write_idx_dataset
from vitscope.data import ValidationSplit, load_dataset, read_idx_folder
from vitscope.errors import VitscopeError

optuna = pytest.importorskip("optuna")
from vitscope.sweep import parse_space, sweep  # noqa: E402  (needs optuna)

TINY = {"patch_size": 7, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "batch_size": 32}
SPACE = 'lr = {low = 1e-4, high = 1e-2, log = true}\nlabel_smoothing = {low = 0.0, high = 0.2}\n' \
        'augment_shift = {low = 0, high = 2}\n'


@pytest.fixture(scope="module")
def train_only_dir(tmp_path_factory):
    """256 synthetic training images and no test files at all: the sweep must not need them."""
    folder = write_idx_dataset(tmp_path_factory.mktemp("data") / "idx", n_train=256, n_test=8)
    for path in folder.glob("t10k-*"):
        path.unlink()
    return folder


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    (folder / "tiny.toml").write_text("".join(f"{k} = {v}\n" for k, v in TINY.items()))
    (folder / "space.toml").write_text(SPACE)
    return folder


def sweep_args(data_dir, files, out, trials=3, epochs=2):
    return ["sweep", "--preset", "seed", "--config", files / "tiny.toml", "--space", files / "space.toml",
            "--dataset", "idx", "--data-dir", data_dir, "--epochs", epochs, "--trials", trials, "--out", out,
            "--no-progress"]


def load(out, name="seed"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def finished(study):
    return [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]


def test_validation_split_is_seeded_disjoint_and_reads_no_test_file(train_only_dir):
    with pytest.raises(VitscopeError, match="t10k"):  # without a split the test files are needed: they are absent
        load_dataset("idx", train_only_dir)
    images = torch.from_numpy(read_idx_folder(train_only_dir, ("train",))["train_images"].copy())
    a = load_dataset("idx", train_only_dir, validation=ValidationSplit(40, seed=1))
    b = load_dataset("idx", train_only_dir, validation=ValidationSplit(40, seed=1))
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.train_images, b.train_images)
    train_index, validation_index = ValidationSplit(40, seed=1).indices(256)
    assert len(set(train_index.tolist()) | set(validation_index.tolist())) == 256
    assert not set(train_index.tolist()) & set(validation_index.tolist())
    assert torch.equal(a.test_images, images[validation_index]) and torch.equal(a.train_images, images[train_index])
    assert a.describe()["validation"] == {"size": 40, "seed": 1, "carved_from": 256}
    other = load_dataset("idx", train_only_dir, validation=ValidationSplit(40, seed=2))
    assert not torch.equal(other.test_images, a.test_images)
    limited = load_dataset("idx", train_only_dir, max_train_samples=100, validation=ValidationSplit(40, seed=1))
    assert torch.equal(limited.test_images, a.test_images) and len(limited.train_labels) == 100
    assert len(load_dataset("idx", train_only_dir, validation=ValidationSplit()).test_labels) == 256 // 6


def test_mnist_with_a_validation_split_verifies_and_needs_only_the_training_files(train_only_dir, monkeypatch):
    from vitscope import data

    arrays = read_idx_folder(train_only_dir, ("train",))  # stand-ins for MNIST: their digests become "MNIST's"
    monkeypatch.setattr(data, "MNIST_SHA256", {**data.MNIST_SHA256, **{k: data.sha256(v) for k, v in arrays.items()}})
    dataset = load_dataset("mnist", train_only_dir, validation=ValidationSplit(40))
    assert len(dataset.test_labels) == 40 and len(dataset.train_labels) == 216


def test_space_file_ints_stay_ints_floats_and_choices_are_read():
    space = parse_space(tomllib.loads('lr = {low = 1e-4, high = 1e-2, log = true}\ndepth = {low = 1, high = 3}\n'
                                      'batch_size = {choices = [16, 32]}\nwarmup_epochs = {low = 0, high = 1}\n'),
                        "seed", {}, "space.toml")
    assert isinstance(space["lr"], optuna.distributions.FloatDistribution) and space["lr"].log
    assert isinstance(space["depth"], optuna.distributions.IntDistribution)
    assert space["batch_size"].choices == (16, 32)
    assert isinstance(space["warmup_epochs"], optuna.distributions.FloatDistribution)  # a float field
    for bad, words in (("nope = {low = 1, high = 2}", "'nope'"), ("device = {choices = ['cpu']}", "'device'"),
                       ("depth = {low = 1.5, high = 3}", "integer"), ("lr = 0.1", "low"),
                       ("lr = {low = 0.0, high = 1.0, log = true}", "lr"), ("optimizer = {choices = ['sgd']}", "sgd")):
        with pytest.raises(VitscopeError, match=words):
            parse_space(tomllib.loads(bad), "seed", {}, "space.toml")


def test_unknown_field_in_the_space_is_one_line_and_exit_2(train_only_dir, sweep_files, tmp_path):
    (tmp_path / "space.toml").write_text("learning_rate = {low = 1e-4, high = 1e-2}\n")
    p = run_cli("sweep", "--space", tmp_path / "space.toml", "--dataset", "idx", "--data-dir", train_only_dir,
                "--out", tmp_path / "sweep")
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "learning_rate" in lines[0], p.stderr


def test_killed_sweep_rerun_finishes_the_trials_an_uninterrupted_one_does(train_only_dir, sweep_files, tmp_path):
    killed = tmp_path / "killed"
    args = sweep_args(train_only_dir, sweep_files, killed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'warm.db'}")  # imports done: the polls below are quick
    process = subprocess.Popen([sys.executable, "-m", "vitscope", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline, study = time.monotonic() + 120, None
        while time.monotonic() < deadline:  # kill it once a trial is complete and the next one is training
            if study is None and (killed / "trials.csv").exists():  # written after a trial: the storage is set up
                study = load(killed)
            if study is not None:
                trials = study.get_trials(deepcopy=False)
                if any(t.state.name == "RUNNING" and len(t.params) == 3 for t in trials):
                    break
            assert process.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    left = [t for t in load(killed).trials if t.state.name == "RUNNING"]
    assert len(left) == 1 and len(finished(load(killed))) < 3

    p = run_cli(*args)  # the same command again
    assert p.returncode == 0, p.stderr
    assert f"trial {left[0].number} left running by a killed sweep: failed, and run again" in p.stdout
    study = load(killed)
    assert len(finished(study)) == 3
    assert study.trials[left[0].number].state.name == "FAIL"
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == left[0].number]
    assert len(retry) == 1 and retry[0].params == left[0].params and retry[0].state.name == "COMPLETE"

    # An uninterrupted sweep finishes the very same trials: same values, same validation accuracy.
    straight = tmp_path / "straight"
    p = run_cli(*sweep_args(train_only_dir, sweep_files, straight))
    assert p.returncode == 0, p.stderr
    assert [(t.params, t.value) for t in finished(load(straight))] == [(t.params, t.value) for t in finished(study)]
    attrs = study.user_attrs["sweep"]
    assert attrs["validation"] == {"size": 42, "seed": 0, "carved_from": 256}

    for name in ("trials.csv", "search.png", "best.toml"):
        assert (killed / name).is_file() and (killed / name).stat().st_size > 0, name
    rows = (killed / "trials.csv").read_text().splitlines()
    assert rows[0] == "number,state,validation_accuracy,seconds,lr,label_smoothing,augment_shift"
    assert len(rows) == 1 + len(study.trials)
    assert "trial" in p.stdout and "val acc" in p.stdout  # the table
    best_text = (killed / "best.toml").read_text()
    assert "validation accuracy" in best_text and "42 images held out of the 256 training images (seed 0)" in best_text
    best = tomllib.loads(best_text)
    assert best == {"preset": "seed", **study.best_trial.params}
    assert isinstance(best["augment_shift"], int)

    # The best config trains: `vitscope train --config best.toml` on the synthetic set (with its test files).
    full = write_idx_dataset(tmp_path / "full", n_train=128, n_test=32)
    run = tmp_path / "run"
    p = run_cli("train", "--config", killed / "best.toml", "--dataset", "idx", "--data-dir", full, "--epochs", "1",
                "--out", run, "--no-progress")
    assert p.returncode == 0, p.stderr
    record = json.loads((run / "config.json").read_text())
    assert record["preset"] == "seed"
    assert {k: record["train"][k] for k in study.best_trial.params} == study.best_trial.params


def test_pruned_trials_count_as_finished_and_stop_training(train_only_dir, tmp_path):
    # A pruner that prunes every trial after its first epoch: any accuracy is above -1.
    study = sweep("seed", {**TINY, "epochs": 3, "dataset": "idx", "data_dir": str(train_only_dir)}, tmp_path / "s",
                  space_file=None, trials=2, pruner=optuna.pruners.ThresholdPruner(upper=-1.0),
                  log=lambda *a: None)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    for trial in study.trials:
        metrics = (tmp_path / "s" / "trials" / f"{trial.number:04d}" / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 1 and trial.value == json.loads(metrics[0])["test_acc"]
    assert not (tmp_path / "s" / "best.toml").exists() and (tmp_path / "s" / "search.png").is_file()


def test_time_budget_stops_starting_trials_and_another_base_is_refused(train_only_dir, tmp_path):
    base = {**TINY, "epochs": 1, "dataset": "idx", "data_dir": str(train_only_dir)}
    study = sweep("seed", base, tmp_path / "s", time_budget=1e-3, log=lambda *a: None)
    assert len(study.trials) == 1 and study.trials[0].state.name == "COMPLETE"
    with pytest.raises(VitscopeError, match="made by another command .base.train.epochs 1, not 2."):
        sweep("seed", {**base, "epochs": 2}, tmp_path / "s", trials=2, log=lambda *a: None)


def test_every_preset_has_a_default_space_that_its_config_accepts():
    from vitscope.config import PRESETS
    from vitscope.sweep import DEFAULT_SPACES, parse_space

    assert set(DEFAULT_SPACES) == set(PRESETS)
    for preset, table in DEFAULT_SPACES.items():
        assert set(parse_space(table, preset, {}, "test")) == set(table)
