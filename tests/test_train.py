import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from vitscope.config import RuntimeConfig, TrainConfig, ViTConfig, read_config_file, resolve_config
from vitscope.errors import VitscopeError
from vitscope.model import ViT
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
