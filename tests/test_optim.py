import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from vitscope.config import TrainConfig, ViTConfig
from vitscope.model import ViT
from vitscope.optim import MuonAdamW, orthogonalize
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
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.05))
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
                         schedule="cosine", dataset="idx", data_dir=str(idx_dir), precision="fp32", device="cpu",
                         compile=compile)

    def quiet(*args, **kwargs):
        pass

    straight = train(model, recipe, tmp_path / "straight", progress=False, log=quiet)
    train(model, recipe, tmp_path / "resumed", progress=False, stop_after_epoch=1, log=quiet)
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
