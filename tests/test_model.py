import math

import pytest
import torch
import torch.nn.functional as F

from vitscope import BlogViT, ViT, ViTConfig, cpu_kernels
from vitscope.errors import VitscopeError
from vitscope.model import (
    GELU,
    GELU_KERNEL_MIN_ELEMENTS,
    HEADS_AS_ROWS_BELOW,
    executed_flops_per_image,
    flops_per_image,
)

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


def test_logits_and_attention_shapes_follow_the_config():
    model = ViT(SEED_SIZE).eval()
    x = torch.randn(3, 1, 28, 28)
    logits, attentions = model(x, return_attention=True)
    assert logits.shape == (3, 10)
    assert len(attentions) == 3
    assert all(a.shape == (3, 4, 17, 17) for a in attentions)


def test_parameter_names_and_shapes_match_timm_layout():
    shapes = {name: tuple(p.shape) for name, p in ViT(SEED_SIZE).named_parameters()}
    assert shapes["cls_token"] == (1, 1, 32)
    assert shapes["pos_embed"] == (1, 17, 32)
    assert shapes["patch_embed.proj.weight"] == (32, 1, 7, 7)
    assert shapes["blocks.2.attn.qkv.weight"] == (96, 32)
    assert shapes["blocks.0.attn.proj.weight"] == (32, 32)
    assert shapes["blocks.0.mlp.fc1.weight"] == (128, 32)
    assert shapes["blocks.0.mlp.fc2.weight"] == (32, 128)
    assert shapes["blocks.1.norm1.weight"] == (32,) and shapes["blocks.1.norm2.bias"] == (32,)
    assert shapes["norm.weight"] == (32,)
    assert shapes["head.weight"] == (10, 32)
    assert "blocks.3.attn.qkv.weight" not in shapes


def test_initialisation_is_truncated_normal_with_std_002():
    torch.manual_seed(0)
    model = ViT(ViTConfig(dim=64, mlp_dim=256, depth=4))
    for weight in (model.pos_embed, model.blocks[0].attn.qkv.weight, model.blocks[3].mlp.fc1.weight):
        assert 0.015 < weight.std().item() < 0.021  # a normal of std 0.02, cut at two std: ~0.0176
        assert weight.abs().max().item() <= 2 * 0.02 + 1e-6
    assert model.blocks[0].attn.qkv.bias.abs().max() == 0


def test_position_embedding_std_is_a_config_field():
    torch.manual_seed(0)
    model = ViT(ViTConfig(dim=64, mlp_dim=256, pos_embed_std=1.0))
    assert 0.75 < model.pos_embed.std().item() < 0.95  # std 1 cut at two std: ~0.88
    assert model.pos_embed.abs().max().item() <= 2.0 + 1e-6
    assert model.blocks[0].attn.qkv.weight.std().item() < 0.021  # the rest keeps std 0.02


def test_fused_and_explicit_attention_give_the_same_logits():
    torch.manual_seed(0)
    model = ViT(ViTConfig(**{**SEED_SIZE.__dict__, "attention": "fused"})).eval()
    x = torch.randn(5, 1, 28, 28)
    fused = model(x)
    logits, _ = model(x, return_attention=True)  # the explicit path
    explicit = ViT(ViTConfig(**{**SEED_SIZE.__dict__, "attention": "explicit"})).eval()
    explicit.load_state_dict(model.state_dict())
    torch.testing.assert_close(fused, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, explicit(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention,dim", [("explicit", 32), ("explicit", 64), ("fused", 32)])
def test_last_block_for_the_class_token_alone_gives_the_same_logits_and_gradients(attention, dim):
    # Explicit at head size 8 takes the heads-as-rows form, at 16 the per-head one.
    assert (dim // SEED_SIZE.heads < HEADS_AS_ROWS_BELOW) == (dim == 32)
    torch.manual_seed(0)
    config = ViTConfig(**{**SEED_SIZE.__dict__, "attention": attention, "dim": dim})
    short = ViT(config)  # last_block_class_token_only is the default
    full = ViT(ViTConfig(**{**config.__dict__, "last_block_class_token_only": False}))
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
    monkeypatch.setattr("vitscope.model._OneExpGELU.apply", lambda x: calls.append("one-exp") or F.gelu(x))
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
        ViTConfig(gelu="tanh").validate()


@pytest.mark.parametrize("implementation", ["one-exp", pytest.param("kernel", marks=needs_kernels)])
def test_a_model_with_one_exp_gelu_gives_atens_logits_and_gradients(implementation):
    torch.manual_seed(0)
    fast = ViT(ViTConfig(**{**SEED_SIZE.__dict__, "gelu": implementation}))
    aten = ViT(ViTConfig(**{**SEED_SIZE.__dict__, "gelu": "aten"}))
    aten.load_state_dict(fast.state_dict())
    assert_same_logits_and_gradients(fast, aten, torch.randn(6, 1, 28, 28))


def test_explicit_attention_equals_a_per_head_computation_from_the_weights():
    torch.manual_seed(1)
    model = ViT(SEED_SIZE).eval()
    tokens = model.tokens(torch.randn(2, 1, 28, 28))
    block = model.blocks[0]
    h = block.norm1(tokens)
    q, k, v = block.attn.qkv(h).chunk(3, dim=-1)
    head = 2
    sl = slice(head * 8, (head + 1) * 8)
    expected = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(8), dim=-1)
    _, attention = block.attn(h, return_attention=True)
    torch.testing.assert_close(attention[:, head], expected, atol=1e-6, rtol=1e-5)


def test_attention_rows_sum_to_one():
    model = ViT(SEED_SIZE).eval()
    _, attentions = model(torch.randn(4, 1, 28, 28), return_attention=True)
    for a in attentions:
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
        assert (a >= 0).all()


def test_head_reads_only_the_class_token():
    # With no blocks, tokens never mix: different images change only patch tokens, so the logits,
    # which must come from the class token alone, cannot change.
    model = ViT(ViTConfig(depth=0)).eval()
    a, b = torch.randn(1, 1, 28, 28), torch.randn(1, 1, 28, 28)
    torch.testing.assert_close(model(a), model(b))
    with torch.no_grad():
        model.cls_token.add_(1.0)
    assert not torch.allclose(model(a), model(b) - 1.0)  # and the class token does matter


def test_patch_embedding_is_a_linear_map_of_each_flattened_patch():
    model = ViT(SEED_SIZE).eval()
    x = torch.randn(2, 1, 28, 28)
    patches = x.unfold(2, 7, 7).unfold(3, 7, 7).reshape(2, 16, 49)  # row-major patches
    weight = model.patch_embed.proj.weight.reshape(32, 49)
    expected = patches @ weight.T + model.patch_embed.proj.bias
    torch.testing.assert_close(model.patch_embed(x), expected, atol=1e-5, rtol=1e-5)



def test_patch_embedding_equals_timms_strided_convolution_for_several_channels():
    import dataclasses
    model = ViT(dataclasses.replace(SEED_SIZE, in_channels=3)).eval()
    x = torch.randn(2, 3, 28, 28)
    proj = model.patch_embed.proj
    expected = F.conv2d(x, proj.weight, proj.bias, stride=7).flatten(2).transpose(1, 2)  # (B, N, D)
    torch.testing.assert_close(model.patch_embed(x), expected, atol=1e-5, rtol=1e-5)

def blog_forward(model: BlogViT, images: torch.Tensor) -> torch.Tensor:
    """The seed blog's forward pass written out per head as in its code, from BlogViT's weights."""
    B = images.shape[0]
    p = images.unfold(2, 7, 7).unfold(3, 7, 7).contiguous().view(B, 16, 49)
    x = model.encoder(p) + model.pos_embedding(p)
    for block in model.blocks:
        h = block.norm1(x)
        q, k, v = block.attn.qkv(h).chunk(3, dim=-1)
        heads = []
        for i in range(4):
            sl = slice(8 * i, 8 * (i + 1))
            wei = q[..., sl] @ k[..., sl].transpose(-2, -1) * x.shape[-1] ** -0.5  # C = embedding size
            heads.append(F.softmax(wei, dim=-1) @ v[..., sl])
        x = x + block.attn.proj(torch.cat(heads, dim=-1))
        x = x + block.mlp.fc2(F.relu(block.mlp.fc1(block.norm2(x))))
    return model.head(model.norm(x))[:, 0]


def test_blog_model_computes_what_the_blog_code_computes():
    torch.manual_seed(0)
    model = BlogViT(ViTConfig(architecture="blog")).eval()
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(x), blog_forward(model, x), atol=1e-5, rtol=1e-5)
    logits, attentions = model(x, return_attention=True)
    assert [a.shape for a in attentions] == [(3, 4, 16, 16)] * 3  # no class token
    assert not any(name in dict(model.named_parameters()) for name in ("cls_token", "pos_embed"))


def test_blog_position_embedding_carries_no_position():
    # Its "position embedding" is a function of the pixels: the same patch content at two places gets
    # the same token, so swapping two patches just swaps their tokens.
    model = BlogViT(ViTConfig(architecture="blog")).eval()
    x = torch.randn(1, 1, 28, 28)
    swapped = x.clone()
    swapped[..., 7:14, 0:7], swapped[..., 14:21, 21:28] = x[..., 14:21, 21:28], x[..., 7:14, 0:7]
    p, q = model.patches(x), model.patches(swapped)
    tokens = model.encoder(p) + model.pos_embedding(p)
    tokens_swapped = model.encoder(q) + model.pos_embedding(q)
    torch.testing.assert_close(tokens_swapped[0, 4], tokens[0, 11])


@pytest.mark.parametrize("patch_size,image_size", [(4, 28), (7, 28), (8, 32)])
def test_other_patch_and_image_sizes(patch_size, image_size):
    config = ViTConfig(image_size=image_size, patch_size=patch_size, dim=48, heads=3, num_classes=7, in_channels=3)
    logits, attentions = ViT(config)(torch.randn(2, 3, image_size, image_size), return_attention=True)
    n = (image_size // patch_size) ** 2 + 1
    assert logits.shape == (2, 7) and attentions[0].shape == (2, 3, n, n)


def test_flops_per_image_of_the_seed_size_matches_the_measured_figure():
    # MEASURED.md: seed size 4.25 MFLOP per training image = 3x forward.
    assert abs(3 * flops_per_image(SEED_SIZE) / 1e6 - 4.25) < 0.1


def test_executed_flops_count_the_multiplies_the_class_token_only_last_block_does():
    # Count the matmul multiply-adds of one forward pass with a FLOP counter, and compare.
    from torch.utils.flop_counter import FlopCounterMode
    for short in (True, False):
        config = ViTConfig(**{**SEED_SIZE.__dict__, "last_block_class_token_only": short, "attention": "explicit"})
        with FlopCounterMode(display=False) as counter:
            ViT(config)(torch.randn(1, 1, 28, 28))
        expected = executed_flops_per_image(config) if short else flops_per_image(config)
        if short and config.dim // config.heads < HEADS_AS_ROWS_BELOW:  # the zeros of the heads-as-rows form
            expected += 2 * 2 * (config.num_patches + 1) * config.dim * (config.heads - 1)
        assert counter.get_total_flops() == expected
    assert executed_flops_per_image(SEED_SIZE) < 0.8 * flops_per_image(SEED_SIZE)
