import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from vitscope.config import RuntimeConfig, TrainConfig, ViTConfig
from vitscope.model import ViT
from vitscope.optim import NS_COEFFICIENTS, MuonAdamW, orthogonalize
from vitscope.train import make_optimizer, train


def test_orthogonalize_gives_the_polar_factor_up_to_newton_schulz_slack():
    torch.manual_seed(0)
    G = torch.randn(3, 64, 256)
    X = orthogonalize(G)
    for g, x in zip(G, X):
        U, _, Vh = torch.linalg.svd(g, full_matrices=False)
        singular = torch.linalg.svdvals(x)
        # The quintic iteration trades exactness for speed: singular values land in ~[0.5, 1.5], not at 1.
        assert singular.min() > 0.4 and singular.max() < 1.6
        polar = U @ Vh
        cosine = (x * polar).sum() / (x.norm() * polar.norm())
        assert cosine > 0.95


def test_orthogonalize_is_the_same_batched_or_one_matrix_at_a_time_and_for_tall_matrices():
    torch.manual_seed(1)
    G = torch.randn(4, 96, 32)
    batched = orthogonalize(G)
    assert torch.allclose(batched, torch.stack([orthogonalize(g) for g in G]), atol=1e-5)
    assert torch.allclose(orthogonalize(G.mT), batched.mT, atol=1e-5)


def test_muon_groups_follow_a_reference_muon_step():
    torch.manual_seed(2)  # wide and tall matrices: the tall one is orthogonalised beside the wide ones, transposed
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((32, 128), (128, 32), (32, 128))]
    reference = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    lr, wd, momentum = 0.01, 0.1, 0.95
    optimizer = MuonAdamW([{"params": params, "muon": True}], lr=lr, weight_decay=wd, momentum=momentum)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(grads):  # Nesterov momentum, orthogonalise, decoupled decay, RMS-matched lr
            buffers[i] = momentum * buffers[i] + (1 - momentum) * g
            update = orthogonalize(g + momentum * (buffers[i] - g))
            reference[i] = reference[i] * (1 - lr * wd) - lr * 0.2 * 128 ** 0.5 * update
    for p, r in zip(params, reference):
        assert torch.allclose(p, r, atol=1e-5)


MUON_SETTINGS = {"lr": 0.05, "weight_decay": 0.5, "momentum": 0.95}


def torch_muon_and_ours(steps: int = 3, **torch_changes):
    """The parameters (wide, tall, square) after `steps` steps of MuonAdamW's Muon and of torch.optim.Muon with
    the same settings (but `torch_changes`) and the same random gradients, and the parameters they started from."""
    torch.manual_seed(5)
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((32, 128), (128, 32), (64, 64))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    a = MuonAdamW([{"params": ours, "muon": True}], **MUON_SETTINGS)
    b = torch.optim.Muon(theirs, **{**MUON_SETTINGS, "nesterov": True, "adjust_lr_fn": "match_rms_adamw",
                                    **torch_changes})
    for _ in range(steps):
        give_both_the_same_random_gradients(ours, theirs)
        a.step()
        b.step()
    return ours, theirs, start


def test_muon_defaults_are_torch_muons():
    defaults = {name: p.default for name, p in inspect.signature(torch.optim.Muon).parameters.items()}
    ours = {name: p.default for name, p in inspect.signature(orthogonalize).parameters.items()}
    assert NS_COEFFICIENTS == defaults["ns_coefficients"]
    assert (ours["steps"], ours["eps"]) == (defaults["ns_steps"], defaults["eps"])
    assert inspect.signature(MuonAdamW).parameters["momentum"].default == defaults["momentum"]


def test_muon_step_is_torch_muons_with_match_rms_adamw_up_to_newton_schulz_precision(monkeypatch):
    # torch runs Newton-Schulz in bfloat16; with ours in its place every other part of the step (momentum,
    # Nesterov, decoupled decay, the learning-rate adjustment) must agree to float32 rounding.
    def fp32_newton_schulz(grad, coefficients, steps, eps):
        assert tuple(coefficients) == NS_COEFFICIENTS
        return orthogonalize(grad, steps, eps)

    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", fp32_newton_schulz)
    ours, theirs, _ = torch_muon_and_ours()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def relative_gap(ours, theirs, start) -> float:
    """max |ours - theirs| over the largest change torch's Muon made, worst parameter."""
    return max(((p - q).abs().max() / (q - s).abs().max()).item() for p, q, s in zip(ours, theirs, start))


def test_muon_step_is_torch_muons_within_bfloat16_rounding():
    # torch's own step, bfloat16 Newton-Schulz and all: ~0.6% apart after 3 steps. Any one setting of torch's
    # changed a little (a 2% larger rate, momentum 0.9, a Newton-Schulz step more) moves it >= 1.2% away.
    assert relative_gap(*torch_muon_and_ours()) < 0.01
    for changed in ({"lr": 0.051}, {"momentum": 0.9}, {"nesterov": False}, {"ns_steps": 6},
                    {"adjust_lr_fn": "original"}, {"weight_decay": 0.45}):
        assert relative_gap(*torch_muon_and_ours(**changed)) > 0.01, changed


def give_both_the_same_random_gradients(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for p, q in zip(ours, theirs):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(3)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = MuonAdamW(ours, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    b = torch.optim.AdamW(theirs, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(5):
        give_both_the_same_random_gradients(ours, theirs)
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, atol=1e-6)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = ViT(ViTConfig(dim=16, depth=2, heads=2, mlp_dim=32))
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.05),
                               RuntimeConfig())
    assert isinstance(optimizer, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert all(g["lr"] == (0.02 if g["muon"] else 1e-3) for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_muon_refuses_tensors_that_are_not_matrices():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.randn(3, 3, 3))], "muon": True}])


def test_muon_learns_from_the_cli(idx_dir, tmp_path):
    run, config = tmp_path / "run", tmp_path / "muon.toml"
    config.write_text('optimizer = "muon"\nmuon_lr = 0.02\nlr = 0.003\nepochs = 3\nbatch_size = 16\n')
    p = run_cli("train", "--preset", "seed", "--config", config, "--dataset", "idx", "--data-dir", idx_dir,
                "--out", run, "--no-progress")
    assert p.returncode == 0, p.stderr
    p = run_cli("eval", run, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["test_acc"] >= 0.9  # chance is 0.25


@pytest.mark.parametrize("compile", ["off", "on"])  # "on": the whole step compiled, the state fed to its graph
def test_muon_run_resumes_bitwise(idx_dir, tmp_path, compile):
    model = ViTConfig(patch_size=7, dim=16, depth=1, heads=2, mlp_dim=32)
    recipe = TrainConfig(epochs=2, batch_size=32, optimizer="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.05,
                         schedule="cosine", dataset="idx", data_dir=str(idx_dir))
    runtime = RuntimeConfig(precision="fp32", device="cpu", compile=compile)

    def quiet(*args, **kwargs):
        pass

    straight = train(model, recipe, tmp_path / "straight", progress=False, log=quiet, runtime=runtime)
    train(model, recipe, tmp_path / "resumed", progress=False, stop_after_epoch=1, log=quiet, runtime=runtime)
    resumed = train(None, None, tmp_path / "resumed", resume=True, progress=False, log=quiet)
    a, b = load_file(str(straight.weights_file)), load_file(str(resumed.weights_file))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_updates_match_eager_ones_as_the_learning_rate_changes():
    torch.manual_seed(4)
    shapes = [(24, 8), (8, 24), (8, 8), (8,), (3, 8)]
    eager = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    compiled = [torch.nn.Parameter(p.detach().clone()) for p in eager]

    def groups(params):
        return [{"params": params[:3], "muon": True, "lr": 0.02}, {"params": params[3:], "weight_decay": 0.0}]

    a = MuonAdamW(groups(eager), lr=0.01, weight_decay=0.1)
    b = MuonAdamW(groups(compiled), lr=0.01, weight_decay=0.1, compile=True)
    for step in range(4):
        for optimizer in (a, b):  # a schedule's new rate each step must reach the compiled update
            for group in optimizer.param_groups:
                group["lr"] = (0.02 if group["muon"] else 0.01) / (step + 1)
        give_both_the_same_random_gradients(eager, compiled)
        a.step()
        b.step()
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a.state[p]["step"], b.state[q]["step"]) for p, q in zip(eager[3:], compiled[3:]))
