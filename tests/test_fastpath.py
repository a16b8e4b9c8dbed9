"""The fast paths compute the plain model's numbers: the same logits and gradients, and the same checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from vitscope import RuntimeConfig, ViT, ViTConfig, cpu_kernels
from vitscope.errors import VitscopeError
from vitscope.fastpath import (
    GELU,
    GELU_KERNEL_MIN_ELEMENTS,
    HEADS_AS_ROWS_BELOW,
    ClassTokenLastBlockViT,
    executed_flops_per_image,
)
from vitscope.model import build_model, flops_per_image

SEED_SIZE = ViTConfig(image_size=28, patch_size=7, in_channels=1, num_classes=10, dim=32, depth=3, heads=4,
                      mlp_dim=128, dropout=0.0)


def assert_same_logits_and_gradients(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    """Two models with the same weights: the same logits, and the same gradients of a cross-entropy loss."""
    labels = torch.randint(0, 10, (x.shape[0],))
    logits_a, logits_b = a(x), b(x)
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=1e-5)
    F.cross_entropy(logits_a, labels).backward()
    F.cross_entropy(logits_b, labels).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_accelerated_model_keeps_the_plain_models_parameters_names_and_logits():
    torch.manual_seed(0)
    plain = ViT(SEED_SIZE)
    fast = build_model(SEED_SIZE, RuntimeConfig())
    fast.load_state_dict(plain.state_dict())
    assert isinstance(fast, ViT) and type(fast) is ClassTokenLastBlockViT
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert_same_logits_and_gradients(fast, plain, torch.randn(6, 1, 28, 28))
    # and a plain model built from the accelerated one's state reads it back exactly
    again = ViT(SEED_SIZE)
    again.load_state_dict(fast.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), fast.parameters()))


@pytest.mark.parametrize("attention,dim", [("explicit", 32), ("explicit", 64), ("fused", 32)])
def test_last_block_for_the_class_token_alone_gives_the_same_logits_and_gradients(attention, dim):
    # Explicit at head size 8 takes the heads-as-rows form, at 16 the per-head one.
    assert (dim // SEED_SIZE.heads < HEADS_AS_ROWS_BELOW) == (dim == 32)
    torch.manual_seed(0)
    config = ViTConfig(**{**SEED_SIZE.__dict__, "dim": dim})
    short = build_model(config, RuntimeConfig(attention=attention))  # last_block_class_token_only is the default
    full = build_model(config, RuntimeConfig(attention=attention, last_block_class_token_only=False))
    full.load_state_dict(short.state_dict())
    x = torch.randn(6, 1, 28, 28)
    assert_same_logits_and_gradients(short, full, x)
    # Asked for the attention maps, every layer's are whole: (B, heads, T, T), the last one included.
    _, attentions = short(x, return_attention=True)
    assert [a.shape for a in attentions] == [(6, 4, 17, 17)] * 3


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason=f"no CPU kernels here: {cpu_kernels.unavailable_reason()}")


@pytest.mark.parametrize("implementation", ["one-exp", pytest.param("kernel", marks=needs_kernels)])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_one_exp_gelu_and_its_gradient_match_atens_exact_gelu(implementation, dtype, atol):
    # 6,001 elements: the kernel's 16-wide pieces and a remainder
    x64 = torch.cat([torch.linspace(-9, 9, 4001, dtype=torch.float64), torch.randn(2000, dtype=torch.float64) * 3])
    x = x64.to(dtype).requires_grad_()
    reference = x.detach().double().requires_grad_()
    y = GELU(implementation)(x)
    expected = F.gelu(reference)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, atol=atol, rtol=atol)
    grad = torch.randn_like(x64)
    y.backward(grad.to(dtype))
    expected.backward(grad)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), reference.grad, atol=atol * 4, rtol=atol)


def test_gelu_is_one_exp_only_where_a_backward_may_follow(monkeypatch):
    calls = []
    monkeypatch.setattr("vitscope.fastpath.OneExpGELU.apply", lambda x: calls.append("one-exp") or F.gelu(x))
    monkeypatch.setattr("vitscope.cpu_gelu.gelu_with_gradient",
                        lambda x, bias=None: calls.append("kernel") or F.gelu(x))
    monkeypatch.setattr("vitscope.cpu_kernels.faster_here", lambda: False)
    x = torch.randn(4, requires_grad=True)
    GELU("auto")(x)
    GELU("one-exp")(x)
    assert calls == ["one-exp", "one-exp"]
    GELU("auto").eval()(x)
    GELU("one-exp").eval()(x)
    with torch.no_grad():
        GELU("one-exp")(x)
    GELU("aten")(x)
    assert calls == ["one-exp", "one-exp"]
    if cpu_kernels.available():  # "auto" takes the kernel on a CPU where it is faster (AVX-512), for large inputs
        monkeypatch.setattr("vitscope.cpu_kernels.faster_here", lambda: True)
        large = torch.zeros(GELU_KERNEL_MIN_ELEMENTS, requires_grad=True)
        GELU("auto")(large)
        GELU("auto")(x)
        GELU("kernel")(x)
        GELU("kernel")(x.detach().half().requires_grad_())  # a dtype the kernel does not take: one-exp
        GELU("kernel").eval()(x)
        assert calls == ["one-exp", "one-exp", "kernel", "one-exp", "kernel", "one-exp"]
    with pytest.raises(VitscopeError, match="gelu must be"):
        RuntimeConfig(gelu="tanh").validate()


@pytest.mark.parametrize("implementation", ["one-exp", pytest.param("kernel", marks=needs_kernels)])
def test_a_model_with_one_exp_gelu_gives_atens_logits_and_gradients(implementation):
    torch.manual_seed(0)
    fast = build_model(SEED_SIZE, RuntimeConfig(gelu=implementation))
    aten = build_model(SEED_SIZE, RuntimeConfig(gelu="aten"))
    aten.load_state_dict(fast.state_dict())
    assert_same_logits_and_gradients(fast, aten, torch.randn(6, 1, 28, 28))




def test_executed_flops_count_the_multiplies_the_class_token_only_last_block_does():
    # Count the matmul multiply-adds of one forward pass with a FLOP counter, and compare.
    from torch.utils.flop_counter import FlopCounterMode
    for short in (True, False):
        runtime = RuntimeConfig(last_block_class_token_only=short, attention="explicit")
        with FlopCounterMode(display=False) as counter:
            build_model(SEED_SIZE, runtime)(torch.randn(1, 1, 28, 28))
        expected = executed_flops_per_image(SEED_SIZE, runtime) if short else flops_per_image(SEED_SIZE)
        if short and SEED_SIZE.dim // SEED_SIZE.heads < HEADS_AS_ROWS_BELOW:  # the zeros of the heads-as-rows form
            expected += 2 * 2 * (SEED_SIZE.num_patches + 1) * SEED_SIZE.dim * (SEED_SIZE.heads - 1)
        assert counter.get_total_flops() == expected
    assert executed_flops_per_image(SEED_SIZE, RuntimeConfig()) < 0.8 * flops_per_image(SEED_SIZE)
