import warnings

import pytest
import torch
import torch.nn.functional as F

from vitscope import RuntimeConfig, ViTConfig, cpu_attention, cpu_gelu, cpu_kernels
from vitscope.fastpath import kernel_is_faster
from vitscope.model import build_model

needs_kernel = pytest.mark.skipif(not cpu_attention.available(),
                                  reason=f"no attention kernel here: {cpu_attention.unavailable_reason()}")
SEED_SIZE = ViTConfig(patch_size=7, dim=32, depth=3, heads=4, mlp_dim=128)


def reference(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """The explicit form in fp64 on the same numbers."""
    B, T, D3 = qkv.shape
    q, k, v = qkv.double().reshape(B, T, 3, heads, D3 // 3 // heads).permute(2, 0, 3, 1, 4)
    out = ((q * scale) @ k.transpose(-1, -2)).softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, T, D3 // 3)


# (batch, tokens, heads, head size). The lane form (head sizes not a multiple of 16): the seed size with a
# whole group of 16 images (its lanes) and with a part of one, head sizes with and without a compile-time loop
# (5, 12) and with an odd number of 16-row tiles (17 x 8). The row form (multiples of 16): the fast and mid
# sizes' heads, token counts that pad to one, two, three, four and five 16-wide pieces, head sizes of one to
# four pieces, one image.
SHAPES = [(16, 17, 4, 8), (3, 17, 4, 8), (17, 5, 3, 5), (33, 17, 4, 12), (16, 3, 1, 24),
          (20, 17, 2, 16), (18, 9, 2, 32), (2, 50, 4, 32), (1, 9, 1, 64), (2, 33, 1, 48), (2, 65, 2, 16)]


def attention_matches_fp64(shape, dtype, with_bias=True):
    """The kernel's output and gradients against the explicit form in fp64, with the qkv layer's bias added by the
    kernel (fp32, as an autocast model's parameter is) or without one."""
    B, T, H, d = shape
    generator = torch.Generator().manual_seed(0)
    qkv = (2 * torch.randn(B, T, 3 * H * d, generator=generator)).to(dtype).requires_grad_()
    bias = torch.randn(3 * H * d, generator=generator).requires_grad_() if with_bias else None
    grad_out = torch.randn(B, T, H * d, generator=generator).to(dtype)
    scale = d ** -0.5
    out = cpu_attention.multi_head_attention(qkv, H, scale, bias)
    out.backward(grad_out)
    exact = qkv.detach().double().requires_grad_()
    exact_bias = bias.detach().double().requires_grad_() if with_bias else torch.zeros((), dtype=torch.float64)
    expected = reference(exact + exact_bias, H, scale)
    expected.backward(grad_out.double())
    assert out.dtype == dtype and qkv.grad.dtype == dtype
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), expected, **tolerance)
    torch.testing.assert_close(qkv.grad.double(), exact.grad, **tolerance)
    if with_bias:  # summed over B x T gradients, in fp32 before they are rounded: the same tolerance, relative
        assert bias.grad.dtype == torch.float32
        torch.testing.assert_close(bias.grad.double(), exact_bias.grad, rtol=tolerance["rtol"],
                                   atol=tolerance["atol"] * B * T ** 0.5)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_computes_attention_and_its_gradient(shape, dtype):
    attention_matches_fp64(shape, dtype)


@needs_kernel
@pytest.mark.parametrize("shape", [(3, 17, 4, 8), (2, 50, 4, 32)])  # the lane form and the row form
def test_the_kernel_without_a_bias(shape):
    attention_matches_fp64(shape, torch.float32, with_bias=False)


@needs_kernel
@pytest.mark.parametrize("shape", [(3, 17, 4, 8), (2, 50, 4, 32), (2, 65, 2, 16), (2, 33, 1, 48)])
def test_the_kernels_built_without_avx512_compute_the_same(shape, monkeypatch):
    # The kernels' plain C++ paths, which AVX2-only CPUs (the Zen 3 host) build, whatever CPU runs the tests:
    # attention, and GELU (with a remainder past its 16-wide pieces).
    monkeypatch.setattr(cpu_kernels, "FLAGS", [*cpu_kernels.FLAGS, "-mno-avx512f"])
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_attention.available()
        for dtype in (torch.float32, torch.bfloat16):
            attention_matches_fp64(shape, dtype)
            gelu_matches_fp64(dtype, columns=11)  # no 16-wide piece: the plain loops alone
    finally:
        cpu_kernels.load.cache_clear()


def gelu_matches_fp64(dtype, columns):
    """The GELU kernel's GELU(x + bias) and its gradients (x's and the bias's) against F.gelu in fp64."""
    generator = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(37, columns, generator=generator)).to(dtype).requires_grad_()
    bias = torch.randn(columns, generator=generator).requires_grad_()
    exact, exact_bias = (t.detach().double().requires_grad_() for t in (x, bias))
    grad = torch.randn(37, columns, generator=generator).to(dtype)
    y = cpu_gelu.gelu_with_gradient(x, bias)
    y.backward(grad)
    expected = F.gelu(exact + exact_bias)
    expected.backward(grad.double())
    tolerance = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert y.dtype == x.grad.dtype == dtype and bias.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, **tolerance)
    torch.testing.assert_close(x.grad.double(), exact.grad, **tolerance)
    torch.testing.assert_close(bias.grad.double(), exact_bias.grad, rtol=tolerance["rtol"], atol=tolerance["atol"] * 37)
    torch.testing.assert_close(cpu_gelu.gelu(x.detach()).double(), F.gelu(exact.detach()), **tolerance)  # no bias


@needs_kernel
@pytest.mark.parametrize("columns", [40, 512])  # 16-wide pieces with a remainder; the mid size's MLP width
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gelu_kernel_adds_a_bias_and_returns_its_gradient(columns, dtype):
    gelu_matches_fp64(dtype, columns)


def assert_same_logits_and_gradients(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    """Two models with the same weights: the same logits, and the same gradients of every parameter."""
    logits = a(x)
    torch.testing.assert_close(logits, b(x), atol=1e-5, rtol=1e-5)
    logits.logsumexp(-1).sum().backward()
    b(x).logsumexp(-1).sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@needs_kernel
def test_a_model_with_the_kernel_gives_the_explicit_forms_logits_and_gradients():
    torch.manual_seed(0)
    kernel = build_model(SEED_SIZE, RuntimeConfig(attention="kernel"))
    explicit = build_model(SEED_SIZE, RuntimeConfig(attention="explicit"))
    explicit.load_state_dict(kernel.state_dict())
    assert all(block.attn.kernel for block in kernel.blocks) and not explicit.blocks[0].attn.kernel
    x = torch.randn(19, 1, 28, 28)
    torch.testing.assert_close(kernel(x, return_attention=True)[0], kernel(x), atol=1e-5, rtol=1e-5)
    assert_same_logits_and_gradients(kernel, explicit, x)


@needs_kernel
@pytest.mark.parametrize("dim", [32, 64])  # head sizes 8 (the lane form) and 16 (the row form)
def test_biases_the_kernels_add_give_the_layers_own_logits_and_gradients(dim):
    torch.manual_seed(0)
    config = ViTConfig(**{**SEED_SIZE.__dict__, "dim": dim})
    inside = build_model(config, RuntimeConfig(attention="kernel", gelu="kernel")).train()
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in inside.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    outside = build_model(config, RuntimeConfig(attention="kernel", gelu="kernel", bias_in_kernels=False)).train()
    outside.load_state_dict(inside.state_dict())
    assert inside.blocks[0].attn.bias_in_kernel and not outside.blocks[0].mlp.bias_in_kernel
    assert_same_logits_and_gradients(inside, outside, torch.randn(7, 1, 28, 28))


@needs_kernel
def test_compiled_grad_through_the_kernel_equals_autograd():
    # The compiled whole step differentiates with torch.func.grad; the kernel's op must be traced, not broken on.
    torch.manual_seed(0)
    model = build_model(SEED_SIZE, RuntimeConfig(attention="kernel"))
    x = torch.randn(5, 1, 28, 28)
    params = dict(model.named_parameters())

    def loss(params, x):
        return torch.func.functional_call(model, params, (x,)).logsumexp(-1).sum()

    compiled = torch.compile(torch.func.grad(loss), fullgraph=True)(params, x)
    loss(params, x).backward()
    for name, p in params.items():
        torch.testing.assert_close(compiled[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@needs_kernel
def test_auto_runs_the_kernel_on_an_avx512_cpu_where_it_was_measured_faster(monkeypatch):
    assert kernel_is_faster(8) and kernel_is_faster(16) and kernel_is_faster(32)  # seed, fast, mid head sizes
    assert not kernel_is_faster(12) and not kernel_is_faster(24)
    for avx512 in (True, False):
        flags = {"avx2"} | ({"avx512f"} if avx512 else set())
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda flags=flags: flags)
        auto = RuntimeConfig()
        assert build_model(SEED_SIZE, auto).blocks[0].attn.kernel == avx512  # head size 8
        assert build_model(ViTConfig(dim=64, heads=4), auto).blocks[0].attn.kernel == avx512  # head size 16
        assert not build_model(ViTConfig(dim=48, heads=4), auto).blocks[0].attn.kernel  # head size 12


def test_without_a_compiler_the_model_falls_back_to_the_explicit_form(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    cpu_kernels.load.cache_clear()
    try:
        assert not cpu_attention.available() and "compiler" in cpu_attention.unavailable_reason()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_model(SEED_SIZE, RuntimeConfig(attention="kernel"))
        assert any("could not be built" in str(w.message) for w in caught)
        assert not model.blocks[0].attn.kernel
        assert build_model(SEED_SIZE, RuntimeConfig())(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    finally:
        cpu_kernels.load.cache_clear()


@needs_kernel
@pytest.mark.parametrize("tokens,dim", [(17, 32), (50, 128)])  # head sizes 8 (lane form) and 32 (row form)
def test_the_kernels_threads_split_the_work_without_changing_a_bit(tokens, dim):
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(48, tokens, 3 * dim, generator=generator).requires_grad_()
    bias = torch.randn(3 * dim, generator=generator).requires_grad_()
    h = torch.randn(300, 40, generator=generator).requires_grad_()  # and GELU's, with its bias
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            qkv.grad = bias.grad = None
            out = cpu_attention.multi_head_attention(qkv, 4, (dim // 4) ** -0.5, bias)
            out.backward(torch.ones_like(out))
            results.append((out.detach(), qkv.grad.clone(), bias.grad.clone()))
            bias.grad = None
            cpu_gelu.gelu_with_gradient(h, bias[:40]).sum().backward()
            results[-1] += (bias.grad.clone(),)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
