import copy
import os
import warnings

import pytest
import torch

from vitscope.config import RuntimeConfig, TrainConfig, ViTConfig
from vitscope.model import ViT, build_model
from vitscope.optim import TensorUpdate
from vitscope.step import WholeStep, make_train_step
from vitscope.train import make_optimizer, make_scheduler

TINY = ViTConfig(patch_size=7, dim=16, depth=2, heads=2, mlp_dim=32)
CPU = torch.device("cpu")


def batches(n: int, size: int = 16):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (size, 28, 28), dtype=torch.uint8, generator=generator),
             torch.randint(0, 10, (size,), generator=generator)) for _ in range(n)]


EAGER = RuntimeConfig(compile="off")
COMPILED = RuntimeConfig(compile="on")


def run_steps(model_config: ViTConfig, recipe: TrainConfig, whole: str | None, steps: int = 6,
              runtime: RuntimeConfig = EAGER):
    """`steps` steps of the usual eager step (whole=None), or of WholeStep run eagerly ("eager") or compiled
    ("compiled"), on the same model, data and schedule (warmup, then cosine: the rate moves every step)."""
    torch.manual_seed(0)
    model = build_model(model_config, runtime)
    optimizer = make_optimizer(model, recipe, runtime)
    scheduler = make_scheduler(optimizer, recipe, steps)
    if whole is None:
        step = make_train_step(model, optimizer, scheduler, recipe, runtime, model_config, CPU, "fp32")
    else:
        step = WholeStep(model, optimizer, scheduler, recipe, runtime, model_config, CPU, "fp32")
        if whole == "eager":
            step.compiled = step.step
    losses, hits = zip(*(step(images, labels) for images, labels in batches(steps)))
    return model, optimizer, torch.stack(losses), torch.stack(hits)


@pytest.mark.parametrize("optimizer,weight_decay,grad_clip,architecture", [
    ("adamw", 0.05, 0.0, "vit"), ("adam", 0.01, 0.5, "vit"), ("muon", 0.05, 0.5, "vit"), ("adam", 0.0, 0.0, "blog")])
def test_whole_step_follows_the_usual_step(optimizer, weight_decay, grad_clip, architecture):
    model_config = ViTConfig(**{**TINY.__dict__, "architecture": architecture})
    recipe = TrainConfig(optimizer=optimizer, lr=3e-3, muon_lr=0.02, weight_decay=weight_decay, grad_clip=grad_clip,
                         epochs=1, schedule="cosine", warmup_epochs=0.5, label_smoothing=0.1,
                         softmax_before_loss=architecture == "blog")
    usual_model, usual_optimizer, usual_losses, usual_hits = run_steps(model_config, recipe, None)
    model, optimizer, losses, hits = run_steps(model_config, recipe, "eager")
    torch.testing.assert_close(losses, usual_losses, atol=1e-5, rtol=1e-5)
    assert torch.equal(hits, usual_hits)
    for (name, p), q in zip(model.named_parameters(), usual_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
        assert p.grad is None
    assert not torch.equal(p, build_model(model_config).get_parameter(name)), "the model's own parameters moved"
    # The optimizer's state is what its own step makes: the same keys, dtypes and values, so checkpoints and
    # resuming with either step work.
    ours, theirs = optimizer.state_dict(), usual_optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for i, state in theirs["state"].items():
        assert {k: v.dtype for k, v in ours["state"][i].items()} == {k: v.dtype for k, v in state.items()}
        for key, value in state.items():
            torch.testing.assert_close(ours["state"][i][key], value, atol=1e-6, rtol=1e-4)


def test_compiled_whole_step_moves_the_model_as_the_eager_one_with_one_graph_for_the_whole_schedule():
    # Traced in this process (not loaded from a saved step: that one never recompiles, its guards would fail).
    recipe = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.05, grad_clip=0.5, epochs=1,
                         schedule="cosine", warmup_epochs=0.5)
    runtime = RuntimeConfig(compile="on", save_compiled_step=False)
    eager_model, _, eager_losses, _ = run_steps(TINY, recipe, "eager", runtime=runtime)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile failed")  # it really compiled
        warnings.filterwarnings("error", message=".*lr_scheduler.step")  # "... before optimizer.step()"
        with torch._dynamo.config.patch(error_on_recompile=True):  # the moving rate is an input, not a constant
            model, _, losses, _ = run_steps(TINY, recipe, "compiled", runtime=runtime)
    torch.testing.assert_close(losses, eager_losses, atol=1e-5, rtol=1e-5)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_make_train_step_takes_the_whole_step_only_where_it_is_asked_for_and_can_be_done():
    def step_for(build=None, optimizer="adamw", **fields):
        recipe, runtime = TrainConfig(optimizer=optimizer), RuntimeConfig(**{"compile": "on", **fields})
        model = ViT(TINY)
        optimizer = build(model.parameters()) if build else make_optimizer(model, recipe, runtime)
        return make_train_step(model, optimizer, make_scheduler(optimizer, recipe, 10), recipe, runtime, TINY, CPU,
                               "fp32")

    assert isinstance(step_for(), WholeStep)
    assert isinstance(step_for(optimizer="muon"), WholeStep)
    assert not isinstance(step_for(compile_whole_step=False), WholeStep)
    assert not isinstance(step_for(compile="off"), WholeStep)
    assert not isinstance(step_for(lambda params: torch.optim.SGD(params, lr=0.1)), WholeStep)
    assert not isinstance(step_for(lambda params: torch.optim.AdamW(params, amsgrad=True)), WholeStep)
    assert TensorUpdate.supports(torch.optim.Adam(ViT(TINY).parameters(), fused=True))


def compiled_run(recipe: TrainConfig, runtime: RuntimeConfig = COMPILED, model_config: ViTConfig = TINY,
                 steps: int = 3):
    """`steps` compiled steps on a fresh model: its parameters, the losses, where the step's code came from, and
    what the training log says of it."""
    torch.manual_seed(0)
    model = build_model(model_config, runtime)
    optimizer = make_optimizer(model, recipe, runtime)
    step = make_train_step(model, optimizer, make_scheduler(optimizer, recipe, steps), recipe, runtime, model_config,
                           CPU, "fp32")
    losses = torch.stack([step(images, labels)[0] for images, labels in batches(steps)])
    return [p.detach().clone() for p in model.parameters()], losses, step.compiled.source, step.compiled.describe()


@pytest.fixture
def saved_steps(tmp_path, monkeypatch):
    """Saved steps go to a folder of the test's own (under their usual names), which it returns."""
    import vitscope.compiled as compiled

    where = compiled.precompiled_path
    monkeypatch.setattr(compiled, "precompiled_path", lambda *args: tmp_path / where(*args).name)
    return tmp_path


def test_a_saved_compiled_step_is_loaded_by_the_next_one_and_moves_the_model_the_same(saved_steps):
    recipe = TrainConfig(optimizer="adamw", lr=3e-3, weight_decay=0.05, grad_clip=0.5, epochs=1, schedule="cosine",
                         warmup_epochs=0.5)
    params, losses, source, said = compiled_run(recipe)
    assert source == "saved" and len(list(saved_steps.iterdir())) == 1 and "saved" in said
    file, = saved_steps.iterdir()
    os.utime(file, (0, 0))
    again = compiled_run(recipe)
    assert again[2] == "loaded" and file.stat().st_mtime > 0  # marked as used: pruned last
    assert again[3].startswith("compiled step loaded")
    assert torch.equal(again[1], losses) and all(torch.equal(p, q) for p, q in zip(again[0], params))
    traced = compiled_run(recipe, RuntimeConfig(compile="on", save_compiled_step=False))
    assert traced[2] == "compiled"
    torch.testing.assert_close(traced[1], losses, atol=1e-6, rtol=1e-6)

    file.write_bytes(b"not a compiled function")  # a damaged file is compiled anew and replaced
    repaired = compiled_run(recipe)
    assert repaired[2] == "saved" and torch.equal(repaired[1], losses)
    assert compiled_run(recipe)[2] == "loaded"


def test_a_saved_step_that_loads_but_fails_when_called_is_deleted_and_the_step_traced(saved_steps, monkeypatch):
    """As a step saved under custom ops' names that no longer exist did, before any tensor was touched: training
    goes on, compiled the usual way."""
    import vitscope.compiled as compiled

    recipe = TrainConfig(optimizer="adamw", lr=3e-3, epochs=1)
    params, losses, source, _ = compiled_run(recipe)
    assert source == "saved" and len(list(saved_steps.iterdir())) == 1

    class Stale:
        def guard_check(self, *args, **kwargs):
            return True

        def fn(self, *args, **kwargs):
            raise AttributeError("'_OpNamespace' 'vitscope' object has no attribute 'attention_000000000000'")

    monkeypatch.setattr(compiled, "precompiled", lambda *args: (Stale(), "loaded"))
    with pytest.warns(UserWarning, match="loaded compiled step failed .*AttributeError"):
        again = compiled_run(recipe)
    assert again[2] == "compiled" and not list(saved_steps.iterdir())
    torch.testing.assert_close(again[1], losses, atol=1e-6, rtol=1e-6)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(again[0], params))


def test_a_saved_step_checks_its_guards_again_when_its_fingerprint_changes_and_traces_where_they_fail(
        saved_steps, monkeypatch):
    import vitscope.compiled as compiled

    recipe = TrainConfig(optimizer="adamw", lr=3e-3, epochs=1)
    torch.manual_seed(0)
    model = build_model(TINY, COMPILED)
    optimizer = make_optimizer(model, recipe, COMPILED)
    step = make_train_step(model, optimizer, make_scheduler(optimizer, recipe, 10), recipe, COMPILED, TINY, CPU,
                           "fp32")
    (images, labels), = batches(1)
    step(images, labels)
    call = step.compiled.call
    assert isinstance(call, compiled.GuardedOnChange)
    checks = []
    check = call.compiled.guard_check
    monkeypatch.setattr(call.compiled, "guard_check", lambda *args: checks.append(1) or check(*args))
    step(images, labels)
    step(images, labels)
    assert not checks  # the same fingerprint: no guards checked
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # new state tensors, as from a checkpoint
    step(images, labels)
    step(images, labels)
    assert len(checks) == 1
    traced = []
    monkeypatch.setattr(call, "fallback", lambda *args: traced.append(1) or (torch.tensor(0.0), torch.tensor(0)))
    model.eval()  # a mode the saved step was not compiled for: its guards fail, and the usual path runs
    step(images, labels)
    assert len(checks) == 2 and traced == [1]
    model.train()
    step(images.mT.contiguous().mT, labels)  # the same shape, other strides: checked, and not the compiled call
    assert len(checks) == 3 and traced == [1, 1]


def test_a_saved_step_is_named_by_the_model_it_runs_not_only_by_the_config_it_is_given():
    recipe = TrainConfig(optimizer="adamw")
    names = set()
    for attention in ("fused", "explicit"):  # the caller passes the same ViTConfig and RuntimeConfig for both
        model = build_model(TINY, RuntimeConfig(attention=attention))
        optimizer = make_optimizer(model, recipe, COMPILED)
        step = WholeStep(model, optimizer, make_scheduler(optimizer, recipe, 10), recipe, COMPILED, TINY, CPU, "fp32")
        names.add(step.compiled.saved_as)
    assert len(names) == 2


def test_only_the_most_recently_used_saved_steps_are_kept(tmp_path):
    from vitscope.compiled import prune_saved

    for age in range(6):
        file = tmp_path / f"{age}.bin"
        file.write_bytes(b"step")
        os.utime(file, (1e9 - age, 1e9 - age))
    (tmp_path / "other.txt").write_text("not a saved step")
    prune_saved(tmp_path, keep=4)
    assert sorted(file.name for file in tmp_path.iterdir()) == ["0.bin", "1.bin", "2.bin", "3.bin", "other.txt"]


def test_what_a_compiled_step_depends_on_names_its_file():
    from vitscope.compiled import precompiled_path

    class Owner:
        def step(self, x):
            return x

    method, x = Owner().step, torch.zeros(4, 3)
    path = precompiled_path(method, "model A", (x,), {})
    assert path == precompiled_path(Owner().step, "model A", (torch.ones(4, 3),), {})  # values do not matter
    others = [precompiled_path(method, "model B", (x,), {}), precompiled_path(method, "model A", (x[:2],), {}),
              precompiled_path(method, "model A", (x.double(),), {}), precompiled_path(method, "model A", (x.T,), {}),
              precompiled_path(method, "model A", ([x],), {}), precompiled_path(method, "model A", (x,), {"k": 1})]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        others.append(precompiled_path(method, "model A", (x,), {}))
    with torch._inductor.config.patch(cpp_wrapper=True):
        others.append(precompiled_path(method, "model A", (x,), {}))
    assert len({path, *others}) == len(others) + 1


def test_a_saved_step_is_never_loaded_under_other_custom_op_names(monkeypatch):
    """The saved graph calls the kernels' ops by their versioned names (cpu_kernels.VERSION, a digest that also
    covers kernels/*.h): a header changed alone once renamed the ops but loaded the old file, whose first call
    then failed with "no attribute 'attention_<old digest>'"."""
    import vitscope.compiled as compiled
    from vitscope.compiled import precompiled_path

    class Owner:
        def step(self, x):
            return x

    x = torch.zeros(4, 3)
    path = precompiled_path(Owner().step, "model A", (x,), {})
    monkeypatch.setattr(compiled, "kernel_ops_version", "0" * 12)
    assert precompiled_path(Owner().step, "model A", (x,), {}) != path


class Uncompiled:
    """A step's function where WholeStep keeps its CompiledOrEager: called as it is, never compiled."""
    source = None

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class ReplayedEagerly:
    """Stands in for a CUDA graph on a CPU: 'captures' by keeping the step and its arguments, and 'replays' by
    calling it on them with the new batch copied in, as a real replay reads the captured buffers."""
    captures = 0

    def __init__(self, step, args, key):
        ReplayedEagerly.captures += 1
        self.step, self.args, self.key = step, args, key
        self.images, self.labels = args[2].clone(), args[3].clone()

    def replay(self, images, labels):
        self.images.copy_(images)
        self.labels.copy_(labels)
        return self.step(self.args[0], self.args[1], self.images, self.labels)


def test_a_graphed_step_is_captured_once_after_its_warmup_calls_and_replayed_for_every_later_step(monkeypatch):
    import vitscope.step as step_module

    monkeypatch.setattr(step_module, "CapturedStep", ReplayedEagerly)
    recipe = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.05, epochs=1, schedule="cosine",
                         warmup_epochs=0.5)
    plain_model, _, plain_losses, _ = run_steps(TINY, recipe, "eager", steps=8)

    torch.manual_seed(0)
    model = build_model(TINY, EAGER)
    optimizer = make_optimizer(model, recipe, EAGER)
    step = WholeStep(model, optimizer, make_scheduler(optimizer, recipe, 8), recipe, EAGER, TINY, CPU, "fp32")
    step.compiled = Uncompiled(step.step)
    step.graph_wanted = True  # as on a CUDA device
    ReplayedEagerly.captures = 0
    losses = torch.stack([step(images, labels)[0] for images, labels in batches(8)])
    # The key of a call (shapes, settings, the tensors' addresses) stays the same from step to step: one capture.
    assert ReplayedEagerly.captures == 1 and step.calls == step_module.GRAPH_WARMUP_CALLS + 1
    assert "captured" in step.graph_note
    # Each batch was trained on once: the capturing call replays its own batch, and nothing runs twice.
    torch.testing.assert_close(losses, plain_losses, atol=1e-6, rtol=1e-6)
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    # A tensor of the step replaced (as load_state_dict replaces the optimizer's state) changes the key: no
    # replay of a graph that would read the old one.
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    images, labels = batches(1)[0]
    before = step.calls
    step(images, labels)
    assert step.calls == before + 1


def test_a_graphed_step_whose_tensors_are_not_all_on_its_device_is_never_captured(monkeypatch):
    import vitscope.step as step_module

    monkeypatch.setattr(step_module, "CapturedStep", ReplayedEagerly)
    recipe = TrainConfig(optimizer="adamw", lr=3e-3, epochs=1)
    model = build_model(TINY, EAGER)
    optimizer = make_optimizer(model, recipe, EAGER)
    step = WholeStep(model, optimizer, make_scheduler(optimizer, recipe, 8), recipe, EAGER, TINY, CPU, "fp32")
    step.compiled = Uncompiled(step.step)
    step.graph_wanted = True
    on_the_host = optimizer.state_dict  # any object: a stand-in for a tensor the step keeps on the host
    monkeypatch.setattr(step_module, "_not_on", lambda device, tensors: [on_the_host])
    ReplayedEagerly.captures = 0
    for images, labels in batches(6):
        step(images, labels)
    assert ReplayedEagerly.captures == 0 and not step.graph_wanted and "1 of the step's tensors" in step.graph_note


def test_the_tensors_a_graph_would_not_reach_are_those_on_another_device():
    from vitscope.step import _not_on

    here, there = torch.zeros(2), torch.zeros(2, device="meta")
    assert _not_on(torch.device("cpu"), [here, there]) == [there]
    assert _not_on(torch.device("meta"), [here, there]) == [here]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_on_a_gpu_the_graphed_compiled_step_trains_as_the_compiled_one(optimizer):
    cuda = torch.device("cuda")
    recipe = TrainConfig(optimizer=optimizer, lr=3e-3, muon_lr=0.02, weight_decay=0.05, grad_clip=0.5, epochs=1,
                         schedule="cosine", warmup_epochs=0.5)
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        runtime = RuntimeConfig(compile="on", save_compiled_step=False, cuda_graph=graph)
        model = build_model(TINY, runtime).to(cuda)
        opt = make_optimizer(model, recipe, runtime)
        step = make_train_step(model, opt, make_scheduler(opt, recipe, 10), recipe, runtime, TINY, cuda, "bf16")
        losses = torch.stack([step(images.to(cuda), labels.to(cuda))[0] for images, labels in batches(10)])
        runs.append((model, losses, step))
    (plain, plain_losses, _), (graphed, losses, step) = runs
    assert step.graph is not None, step.graph_note
    assert step.graph_note.startswith("step captured"), step.graph_note
    torch.testing.assert_close(losses, plain_losses, atol=1e-4, rtol=1e-4)
    for p, q in zip(graphed.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)
