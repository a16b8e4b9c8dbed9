import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from vitscope.config import RuntimeConfig, TrainConfig, ViTConfig, read_config_file, resolve_config
from vitscope.errors import Interrupted, VitscopeError
from vitscope.model import ViT
from vitscope.rundir import RunDir
from vitscope.step import loss_of
from vitscope.train import lr_factor, parameter_groups, train

TINY = ViTConfig(patch_size=7, dim=16, depth=1, heads=2, mlp_dim=32)
FP32_CPU = RuntimeConfig(precision="fp32", device="cpu")


def tiny_recipe(data_dir, **overrides):
    fields = dict(epochs=3, batch_size=32, lr=2e-3, optimizer="adamw", weight_decay=0.05, schedule="cosine",
                  warmup_epochs=0.5, label_smoothing=0.1, augment_shift=2, dataset="idx", data_dir=str(data_dir))
    return TrainConfig(**{**fields, **overrides})


def quiet(*args, **kwargs):
    pass


def test_one_epoch_cli_run_writes_a_complete_run_directory(idx_dir, tmp_path):
    run = tmp_path / "run"
    p = run_cli("train", "--preset", "seed", "--dataset", "idx", "--data-dir", idx_dir, "--epochs", "1",
                "--out", run, "--no-progress", "--seed", "3")
    assert p.returncode == 0, p.stderr
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "checkpoint/state.pt",
                 "plots/accuracy.png", "plots/loss.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert set(rows[0]) >= {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds",
                            "images_per_second"}
    config = json.loads((run / "config.json").read_text())
    assert config["seed"] == 3 and config["preset"] == "seed"
    assert config["dataset"]["name"] == "idx" and config["dataset"]["location"] == str(idx_dir.resolve())
    assert config["model"]["num_classes"] == 4  # from the files, not the preset's 10
    assert config["hardware"]["cpu"] and config["versions"]["torch"] == torch.__version__
    assert "run directory:" in p.stdout and "epoch   1/1" in p.stdout
    weights = load_file(str(run / "model.safetensors"))
    assert weights["pos_embed"].shape == (1, 17, 32)


def test_training_learns_and_eval_reports_it(idx_dir, tmp_path):
    run = tmp_path / "run"
    p = run_cli("train", "--preset", "seed", "--dataset", "idx", "--data-dir", idx_dir, "--epochs", "4",
                "--batch-size", "16", "--out", run, "--no-progress")
    assert p.returncode == 0, p.stderr
    p = run_cli("eval", run, "--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["n"] == 128 and result["test_acc"] >= 0.9  # chance is 0.25
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(last["test_acc"] - result["test_acc"]) < 1e-9  # eval agrees with the run's own last epoch


def test_resumed_run_ends_with_bitwise_the_same_weights(idx_dir, tmp_path):
    model = ViTConfig(**{**TINY.__dict__, "dropout": 0.1})  # dropout draws from the global RNG too
    recipe = tiny_recipe(idx_dir)
    straight = train(model, recipe, tmp_path / "straight", progress=False, log=quiet, runtime=FP32_CPU)
    interrupted = train(model, recipe, tmp_path / "resumed", progress=False, stop_after_epoch=1, log=quiet,
                        runtime=FP32_CPU)
    assert not interrupted.weights_file.exists() and len(interrupted.read_metrics()) == 1
    torch.manual_seed(12345)  # a resumed process starts from other RNG state: the checkpoint must restore it
    resumed = train(None, None, tmp_path / "resumed", resume=True, progress=False, log=quiet)
    a, b = load_file(str(straight.weights_file)), load_file(str(resumed.weights_file))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")} for row in
             straight.read_metrics()]
    assert strip == [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")}
                     for row in resumed.read_metrics()]


def test_different_seeds_give_different_weights(idx_dir, tmp_path):
    a = train(TINY, tiny_recipe(idx_dir, epochs=1, seed=0), tmp_path / "a", progress=False, log=quiet, runtime=FP32_CPU)
    b = train(TINY, tiny_recipe(idx_dir, epochs=1, seed=1), tmp_path / "b", progress=False, log=quiet, runtime=FP32_CPU)
    wa, wb = load_file(str(a.weights_file)), load_file(str(b.weights_file))
    assert not torch.equal(wa["head.weight"], wb["head.weight"])


def test_a_finished_run_is_not_overwritten(idx_dir, tmp_path):
    train(TINY, tiny_recipe(idx_dir, epochs=1), tmp_path / "run", progress=False, log=quiet, runtime=FP32_CPU)
    with pytest.raises(VitscopeError, match="already holds a run"):
        train(TINY, tiny_recipe(idx_dir, epochs=1), tmp_path / "run", progress=False, log=quiet, runtime=FP32_CPU)


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, total, warmup, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, total, warmup, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(70, total, 0, "constant") == 1.0


def test_softmax_before_loss_is_the_blogs_cross_entropy_of_probabilities():
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    probs = logits.softmax(-1)
    expected = -(probs.softmax(-1)[torch.arange(8), labels].log()).mean()
    assert loss_of(logits, labels, TrainConfig(softmax_before_loss=True)).item() == pytest.approx(expected.item())
    plain = -(logits.log_softmax(-1)[torch.arange(8), labels]).mean()
    assert loss_of(logits, labels, TrainConfig()).item() == pytest.approx(plain.item(), rel=1e-6)


def test_weight_decay_skips_biases_norms_class_token_and_position_embeddings():
    model = ViT(TINY)
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "head.weight" in decayed
    assert not decayed & {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_config_file_sets_fields_and_flags_override_it(tmp_path):
    (tmp_path / "c.toml").write_text('lr = 0.01\nepochs = 7\n[model]\ndim = 48\nheads = 6\n')
    (tmp_path / "c.json").write_text(json.dumps({"preset": "blog", "batch_size": 128}))
    overrides = read_config_file(tmp_path / "c.toml")
    model, recipe, _ = resolve_config("seed", {**overrides, "epochs": 2})
    assert (model.dim, model.heads, recipe.lr, recipe.epochs) == (48, 6, 0.01, 2)
    assert read_config_file(tmp_path / "c.json") == {"preset": "blog", "batch_size": 128}


@pytest.mark.parametrize("overrides,message", [
    ({"no_such_field": 1}, "unknown config field"),
    ({"lr": "fast"}, "must be float"),
    ({"optimizer": "sgd"}, "optimizer must be one of"),
    ({"dim": 30, "heads": 4}, "not divisible"),
    ({"compile": "yes"}, "compile must be one of auto, on, off"),
    ({"compile": 1}, "must be str | bool"),
])
def test_bad_config_values_are_user_errors(overrides, message):
    with pytest.raises(VitscopeError, match=message):
        resolve_config("seed", overrides)


def test_blog_recipe_file_in_the_repository_is_the_blogs_exact_recipe():
    from pathlib import Path
    fields = read_config_file(Path(__file__).parents[1] / "configs" / "seed-blog-recipe.toml")
    model, recipe, _ = resolve_config("seed", fields)
    assert (recipe.optimizer, recipe.lr, recipe.schedule, recipe.batch_size, recipe.epochs) == (
        "adam", 3e-4, "constant", 64, 20)
    assert recipe.weight_decay == 0 and recipe.label_smoothing == 0 and recipe.augment_shift == 0
    assert recipe.warmup_epochs == 0 and math.isclose(model.dim, 32) and model.architecture == "vit"


def test_fast_preset_is_the_default_and_trains_with_muon(idx_dir, tmp_path):
    from vitscope.config import DEFAULT_PRESET
    assert DEFAULT_PRESET == "fast"
    model, recipe, runtime = resolve_config("fast", {})
    assert (model.patch_size, model.dim, model.depth, model.heads, model.mlp_dim) == (7, 64, 4, 4, 256)
    assert recipe.optimizer == "muon" and runtime.precision == "auto"
    run = tmp_path / "run"
    p = run_cli("train", "--dataset", "idx", "--data-dir", idx_dir, "--epochs", "2", "--out", run, "--no-progress")
    assert p.returncode == 0, p.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "fast" and config["train"]["optimizer"] == "muon"
    assert config["model"]["pos_embed_std"] == 1.0
    assert config["precision"] in ("fp32", "bf16")


def test_compile_auto_compiles_long_runs_on_cpu_and_cuda_only():
    from vitscope.config import COMPILE_MIN_STEPS
    from vitscope.train import settle_compile
    auto, cpu = RuntimeConfig(), torch.device("cpu")
    assert auto.compile == "auto"
    assert settle_compile(auto, cpu, COMPILE_MIN_STEPS) == "on"
    assert settle_compile(auto, cpu, COMPILE_MIN_STEPS - 1) == "off"  # a short run: compiling would not pay
    assert settle_compile(auto, torch.device("cuda"), 10**5) == "on"
    assert settle_compile(auto, torch.device("mps"), 10**5) == "off"
    assert settle_compile(RuntimeConfig(compile="on"), cpu, 1) == "on"
    assert settle_compile(RuntimeConfig(compile="off"), cpu, 10**5) == "off"
    # true / false, as config files and runs from before "auto" have them, mean on / off
    assert RuntimeConfig(compile=True).compile == "on" and RuntimeConfig(compile=False).compile == "off"
    assert resolve_config("fast", {"compile": True})[2].compile == "on"
    assert resolve_config("fast", {"compile": "off"})[2].compile == "off"


def test_a_short_run_says_it_trains_eager_and_records_it(idx_dir, tmp_path):
    lines = []
    run = train(TINY, tiny_recipe(idx_dir, epochs=1), tmp_path / "run", progress=False, log=lines.append,
                runtime=FP32_CPU)
    assert any(line.startswith("model:") and line.endswith(", eager") for line in lines), lines
    assert json.loads(run.config_file.read_text())["compiled"] is False


def test_the_log_says_once_where_the_compiled_step_came_from(monkeypatch, idx_dir, tmp_path):
    import vitscope.train as train_module
    make_step = train_module.make_train_step

    def described(*args, **kwargs):
        step = make_step(*args, **kwargs)  # compile is off in this short run: the eager step, stood in for
        step.compiled = type("Compiled", (), {"describe": lambda self: "compiled step loaded (test)"})()
        return step

    monkeypatch.setattr(train_module, "make_train_step", described)
    lines = []
    train(TINY, tiny_recipe(idx_dir, epochs=2), tmp_path / "run", progress=False, log=lines.append, runtime=FP32_CPU)
    assert lines.count("compiled step loaded (test)") == 1  # after the first epoch only
    assert lines.index("compiled step loaded (test)") < next(i for i, line in enumerate(lines)
                                                            if line.startswith("epoch   1/2"))


def test_a_run_whose_compile_failed_records_that_it_trained_uncompiled(monkeypatch, idx_dir, tmp_path):
    def broken_compile(fn, **kwargs):
        def call(*args, **kwargs):
            raise RuntimeError("InductorError: AssertionError")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        run = train(TINY, tiny_recipe(idx_dir, epochs=1), tmp_path / "run", progress=False, log=quiet,
                    runtime=RuntimeConfig(precision="fp32", device="cpu", compile="on"))
    record = json.loads(run.config_file.read_text())
    assert record["compiled"] is False and record["compile_failed"] is True
    assert record["runtime"]["compile"] == "on"  # what was asked for stays in the record


@pytest.mark.parametrize("whole_step", [True, False])  # the whole step as one graph, or forward and loss
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # Muon compiles its update too
def test_a_failing_torch_compile_warns_and_trains_on_uncompiled(monkeypatch, optimizer, whole_step):
    from vitscope.train import make_optimizer, make_scheduler, make_train_step

    def broken_compile(model):
        def call(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(0)
    model = ViT(TINY)
    recipe = TrainConfig(lr=1e-3, optimizer=optimizer)
    runtime = RuntimeConfig(compile="on", compile_whole_step=whole_step)
    optimizer = make_optimizer(model, recipe, runtime)
    step = make_train_step(model, optimizer, make_scheduler(optimizer, recipe, 10), recipe, runtime, TINY,
                           torch.device("cpu"), "fp32")
    images, labels = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (8,))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="torch.compile failed.*InvalidCxxCompiler"):
        loss, _ = step(images, labels)
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters()), "every parameter steps"
    step(images, labels)  # and on, without trying again
    assert step.compiled.source == "eager" and "uncompiled" in step.compiled.describe()  # as the log says it


@pytest.mark.parametrize("keep", [True, False])
def test_keep_freed_memory_is_a_field_that_turns_the_malloc_setting_off(monkeypatch, idx_dir, tmp_path, keep):
    calls = []
    import vitscope.process as process_module
    monkeypatch.setattr(process_module, "keep_freed_memory", lambda: calls.append(1) or True)
    train(TINY, tiny_recipe(idx_dir, epochs=1), tmp_path / "run", progress=False, log=lambda line: None,
          runtime=dataclasses.replace(FP32_CPU, keep_freed_memory=keep))
    assert len(calls) == (1 if keep else 0)


# ---- checkpoints, resume and faults ---------------------------------------------------------------------------

def stepping(monkeypatch, action, at: int):
    """Make train's step call `action(model)` after its `at`-th call (1-based), once."""
    import vitscope.train as train_module
    make_step = train_module.make_train_step
    calls = []

    def make(model, *args, **kwargs):
        step = make_step(model, *args, **kwargs)

        def counted(images, labels):
            result = step(images, labels)
            calls.append(1)
            if len(calls) == at:
                action(model)
            return result

        counted.compiled = step.compiled
        return counted

    monkeypatch.setattr(train_module, "make_train_step", make)


def weights_equal(a, b) -> bool:
    a, b = load_file(str(a.weights_file)), load_file(str(b.weights_file))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")} for row in rows]


AUGMENTED = dict(augment_rotate=10.0, augment_scale=0.1, augment_stroke=0.5, augment_close=1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_mid_epoch_and_the_resumed_run_ends_bitwise_equal(monkeypatch, idx_dir, tmp_path,
                                                                                       signum):
    model = ViTConfig(**{**TINY.__dict__, "dropout": 0.1})
    recipe = tiny_recipe(idx_dir, **AUGMENTED)
    straight = train(model, recipe, tmp_path / "straight", progress=False, log=quiet, runtime=FP32_CPU)
    stepping(monkeypatch, lambda model: os.kill(os.getpid(), signum), at=21)  # epoch 2 of 16-step epochs
    with pytest.raises(Interrupted) as stopped:
        train(model, recipe, tmp_path / "resumed", progress=False, log=quiet, runtime=FP32_CPU)
    assert stopped.value.exit_code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} after step 21 of 48: checkpoint saved" in stopped.value.message
    run = RunDir(tmp_path / "resumed")
    assert run.load_checkpoint()["step"] == 21 and len(run.read_metrics()) == 1
    monkeypatch.undo()
    torch.manual_seed(12345)
    resumed = train(None, None, tmp_path / "resumed", resume=True, progress=False, log=quiet)
    assert weights_equal(straight, resumed)
    assert comparable(straight.read_metrics()) == comparable(resumed.read_metrics())


def test_a_signal_before_the_first_step_stops_at_once_and_the_same_call_starts_again(monkeypatch, idx_dir, tmp_path):
    import vitscope.train as train_module
    monkeypatch.setattr(train_module, "make_train_step", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Interrupted, match="before the first training step: nothing new to save"):
        train(TINY, tiny_recipe(idx_dir, epochs=1), tmp_path / "run", progress=False, log=quiet, runtime=FP32_CPU)
    run = RunDir(tmp_path / "run")
    assert run.exists() and not run.checkpoint_file.exists()  # killed before its first checkpoint
    monkeypatch.undo()
    with pytest.raises(VitscopeError, match="already holds a run"):  # other settings: refused
        train(TINY, tiny_recipe(idx_dir, epochs=2), tmp_path / "run", progress=False, log=quiet, runtime=FP32_CPU)
    train(TINY, tiny_recipe(idx_dir, epochs=1), tmp_path / "run", progress=False, log=quiet, runtime=FP32_CPU)
    assert run.weights_file.is_file()


def test_resume_of_a_run_without_a_checkpoint_starts_it_from_the_beginning(monkeypatch, idx_dir, tmp_path):
    import vitscope.train as train_module
    monkeypatch.setattr(train_module, "make_train_step", lambda *a, **k: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(Interrupted):
        train(TINY, tiny_recipe(idx_dir, epochs=1), tmp_path / "run", progress=False, log=quiet, runtime=FP32_CPU)
    monkeypatch.undo()
    lines = []
    train(None, None, tmp_path / "run", resume=True, progress=False, log=lines.append)
    assert any("from the beginning (it has no checkpoint yet)" in line for line in lines), lines
    assert len(RunDir(tmp_path / "run").read_metrics()) == 1


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(monkeypatch, idx_dir, tmp_path):
    import errno
    import io

    import vitscope.rundir as rundir_module
    recipe = tiny_recipe(idx_dir)
    straight = train(TINY, recipe, tmp_path / "straight", progress=False, log=quiet, runtime=FP32_CPU)
    real_save, saves = torch.save, []

    def disk_fills_up(state, file):  # the second checkpoint: half of it written, then no space left
        saves.append(1)
        if len(saves) < 2:
            return real_save(state, file)
        buffer = io.BytesIO()
        real_save(state, buffer)
        file.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir_module.torch, "save", disk_fills_up)
    with pytest.raises(VitscopeError, match="No space left on device; the previous checkpoint there is intact"):
        train(TINY, recipe, tmp_path / "run", progress=False, log=quiet, runtime=FP32_CPU)
    monkeypatch.undo()
    run = RunDir(tmp_path / "run")
    assert run.load_checkpoint()["epoch"] == 1  # loadable, its checksum verified
    assert sorted(p.name for p in run.checkpoint_file.parent.iterdir()) == ["state.pt"]  # no half-written file
    resumed = train(None, None, run.path, resume=True, progress=False, log=quiet)
    assert weights_equal(straight, resumed)


@pytest.mark.parametrize("damage,words", [("a weight's bit", "its contents do not match their SHA-256"),
                                          ("the pickle's bit", "damaged"),  # unloadable, or other values
                                          ("truncated", "it is damaged, or not a vitscope checkpoint")])
def test_a_damaged_checkpoint_is_refused_and_named(idx_dir, tmp_path, damage, words):
    import struct
    import zipfile
    run = train(TINY, tiny_recipe(idx_dir), tmp_path / "run", progress=False, stop_after_epoch=1, log=quiet,
                runtime=FP32_CPU)
    data = bytearray(run.checkpoint_file.read_bytes())
    with zipfile.ZipFile(run.checkpoint_file) as archive:
        members = archive.infolist()
    largest = max((m for m in members if "/data/" in m.filename), key=lambda m: m.file_size)  # a weight's bytes
    pickle = next(m for m in members if m.filename.endswith("data.pkl"))
    for member in ((largest,) if damage == "a weight's bit" else (pickle,) if damage == "the pickle's bit" else ()):
        name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
        data[member.header_offset + 30 + name_length + extra_length + member.file_size // 2] ^= 0x01
    if damage == "truncated":
        data = data[:len(data) // 2]
    run.checkpoint_file.write_bytes(bytes(data))
    p = run_cli("train", "--resume", "--out", run.path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run.checkpoint_file) in lines[0] and words in lines[0], lines


def test_a_loss_that_turns_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(monkeypatch, idx_dir,
                                                                                                 tmp_path):
    def poison(model):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

    stepping(monkeypatch, poison, at=10)  # the weights go bad after step 10: the loss of step 11 is NaN
    runtime = dataclasses.replace(FP32_CPU, checkpoint_every=4)
    with pytest.raises(VitscopeError, match=r"the training loss became NaN or infinite at step 11 of 48 \(epoch 1\): "
                                            r"training stopped; the last good checkpoint \(after step 8\) is kept"):
        train(TINY, tiny_recipe(idx_dir), tmp_path / "run", progress=False, log=quiet, runtime=runtime)
    state = RunDir(tmp_path / "run").load_checkpoint()
    assert state["step"] == 8 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_checkpoints_are_written_every_n_steps_and_resume_mid_epoch_exactly(monkeypatch, idx_dir, tmp_path):
    recipe = tiny_recipe(idx_dir, **AUGMENTED)
    runtime = dataclasses.replace(FP32_CPU, checkpoint_every=5)
    straight = train(TINY, recipe, tmp_path / "straight", progress=False, log=quiet, runtime=runtime)
    saved = []
    import vitscope.rundir as rundir_module
    real_save = rundir_module.RunDir.save_checkpoint
    monkeypatch.setattr(rundir_module.RunDir, "save_checkpoint",
                        lambda self, state: saved.append(state["step"]) or real_save(self, state))
    stepping(monkeypatch, lambda model: os.kill(os.getpid(), signal.SIGTERM), at=37)
    with pytest.raises(Interrupted):
        train(TINY, recipe, tmp_path / "resumed", progress=False, log=quiet, runtime=runtime)
    assert saved == [5, 10, 15, 16, 20, 25, 30, 32, 35, 37]  # every 5 steps, every epoch's end (16), the signal's
    monkeypatch.undo()
    resumed = train(None, None, tmp_path / "resumed", resume=True, progress=False, log=quiet)
    assert weights_equal(straight, resumed)
    assert comparable(straight.read_metrics()) == comparable(resumed.read_metrics())


def test_a_resumed_run_keeps_the_compile_choice_it_began_with(monkeypatch, idx_dir, tmp_path):
    import vitscope.train as train_module
    monkeypatch.setattr(train_module, "COMPILE_MIN_STEPS", 40)  # 48 steps in all: compiled; 32 left: would not be
    seen, make_step = [], train_module.make_train_step

    def make(model, optimizer, scheduler, recipe, runtime, *args):
        seen.append(runtime.compile)
        return make_step(model, optimizer, scheduler, recipe, dataclasses.replace(runtime, compile="off"), *args)

    monkeypatch.setattr(train_module, "make_train_step", make)
    auto = dataclasses.replace(FP32_CPU, compile="auto")
    train(TINY, tiny_recipe(idx_dir), tmp_path / "run", progress=False, stop_after_epoch=1, log=quiet, runtime=auto)
    lines = []
    train(None, None, tmp_path / "run", resume=True, progress=False, log=lines.append)
    assert seen == ["on", "on"]
    assert any(line.startswith("model:") and line.endswith(", compiled") for line in lines)


def test_resume_refuses_flags_that_contradict_the_run(idx_dir, tmp_path):
    run = train(TINY, tiny_recipe(idx_dir, epochs=1), tmp_path / "run", progress=False, log=quiet, runtime=FP32_CPU)
    p = run_cli("train", "--resume", "--out", run.path, "--epochs", "3", "--lr", "0.01", "--no-progress")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "epochs 3 (the run has 1); lr 0.01 (the run has 0.002)" in p.stderr
    with pytest.raises(VitscopeError, match="preset seed"):
        train(None, None, run.path, resume=True, progress=False, log=quiet, given={"preset": "seed"})
    # flags that agree with the run, and those a resumed run may change, are taken
    train(None, None, run.path, resume=True, progress=False, log=quiet,
          given={"epochs": 1, "data_dir": str(idx_dir), "precision": "fp32", "threads": 1, "checkpoint_every": 3})


def test_out_holding_other_files_is_refused_unless_overwrite(idx_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    p = subprocess.run([sys.executable, "-m", "vitscope", "train", "--dataset", "idx", "--data-dir", str(idx_dir),
                        "--out", "."], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert ". holds other files, not a vitscope run: choose another --out, or pass --overwrite" in p.stderr
    recipe = tiny_recipe(idx_dir, epochs=1)
    with pytest.raises(VitscopeError, match="holds other files"):
        train(TINY, recipe, tmp_path, progress=False, log=quiet, runtime=FP32_CPU)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["idx", "notes.txt"]
    train(TINY, recipe, tmp_path, progress=False, log=quiet, runtime=FP32_CPU, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "model.safetensors").is_file()
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "config.json").write_text('{"model_type": "vit"}')  # a config.json, not a run's
    with pytest.raises(VitscopeError, match="holds other files"):
        train(TINY, recipe, tmp_path / "exported", progress=False, log=quiet, runtime=FP32_CPU)
    with pytest.raises(VitscopeError, match="already holds a run: pass --resume to continue it, --overwrite"):
        train(TINY, tiny_recipe(idx_dir, epochs=1, seed=5), tmp_path, progress=False, log=quiet, runtime=FP32_CPU)
    train(TINY, tiny_recipe(idx_dir, epochs=1, seed=5), tmp_path, progress=False, log=quiet, runtime=FP32_CPU,
          overwrite=True)  # replaces the run, not the notes
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 5
    assert (tmp_path / "notes.txt").read_text() == "mine"


def kill_after(process, run: RunDir, checkpoints: int, delay: float, timeout: float = 300) -> None:
    """SIGKILL `process` `delay` seconds after it has written `checkpoints` checkpoints (0: after it started)."""
    def stamp():
        try:
            status = run.checkpoint_file.stat()
        except FileNotFoundError:
            return None
        return status.st_ino, status.st_mtime_ns  # each save renames a new file into place

    last, seen, deadline = stamp(), 0, time.monotonic() + timeout
    while seen < checkpoints and process.poll() is None and time.monotonic() < deadline:
        if stamp() != last:
            seen, last = seen + 1, stamp()
        time.sleep(0.01)
    time.sleep(delay)
    process.kill()
    process.wait()


@pytest.mark.slow  # ~6 processes; the first run of a machine compiles the step (~20 s on 2 cores)
def test_sigkill_at_random_moments_then_resume_ends_bitwise_equal_across_the_compile_threshold(tmp_path):
    import random

    from conftest import write_idx_dataset
    data = write_idx_dataset(tmp_path / "idx", n_train=512, n_test=64)
    (tmp_path / "tiny.toml").write_text("dim = 16\ndepth = 1\nheads = 2\nmlp_dim = 32\n")
    # 64 steps an epoch, 8 epochs: 512 steps, so compile = "auto" compiles; resumed with fewer than 500 steps left,
    # the run must go on compiled, as it began.
    args = ["train", "--preset", "seed", "--dataset", "idx", "--data-dir", data, "--epochs", "8", "--batch-size", "8",
            "--config", tmp_path / "tiny.toml", "--checkpoint-every", "16", "--no-progress"]
    p = run_cli(*args, "--out", tmp_path / "straight")
    assert p.returncode == 0, p.stderr
    straight = RunDir(tmp_path / "straight")
    assert json.loads(straight.config_file.read_text())["compiled"] is True

    run = RunDir(tmp_path / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "vitscope", *map(str, args), "--out", str(run.path)]
    rng = random.Random(27)
    # Killed before its first checkpoint: the same command starts it again.
    kill_after(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), run, 0,
               rng.uniform(0.2, 1.0))
    assert not run.checkpoint_file.exists()
    steps_at_kills = []
    for _ in range(3):
        resume = [] if not run.checkpoint_file.exists() else ["--resume"]
        process = subprocess.Popen(command + resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_after(process, run, rng.randint(1, 4), rng.uniform(0.0, 0.05))
        if run.checkpoint_file.exists():
            steps_at_kills.append(run.load_checkpoint()["step"])
    p = run_cli(*args, "--out", run.path, "--resume")
    assert p.returncode == 0, p.stderr
    assert steps_at_kills and max(steps_at_kills) > 512 - 500, steps_at_kills  # a resume had fewer than 500 left
    assert "compiled" in p.stdout.split("model:")[1].splitlines()[0]
    assert weights_equal(straight, run)
    assert comparable(straight.read_metrics()) == comparable(run.read_metrics())


def test_sigterm_on_the_command_line_exits_143_with_one_line_after_saving(idx_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    (tmp_path / "tiny.toml").write_text('dim = 16\ndepth = 1\nheads = 2\nmlp_dim = 32\ncompile = "off"\n')
    process = subprocess.Popen([sys.executable, "-m", "vitscope", "train", "--preset", "seed", "--dataset", "idx",
                                "--data-dir", str(idx_dir), "--epochs", "200", "--config", str(tmp_path / "tiny.toml"),
                                "--out", str(run.path), "--no-progress"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not run.checkpoint_file.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitscope train: stopped by SIGTERM after step "), stderr
    step = int(lines[0].split("after step ")[1].split()[0])
    assert run.load_checkpoint()["step"] == step
