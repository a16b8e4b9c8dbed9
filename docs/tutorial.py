# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Learn the Vision Transformer with vitscope
#
# A walk through the ViT of Dosovitskiy et al. (2020), *An Image is Worth 16x16 Words*, on MNIST digits, with
# vitscope's own code: cut an image into patches, embed them, add a class token and position embeddings, run one
# encoder block, train the `scope` model, then draw the paper's figures from it and read what they show.
# It follows the seed blog post the project started from, and ends with that blog's model beside the faithful
# ViT.
#
# **How to run it.** From the repository root, after `make setup` (and `vitscope data` once, which caches
# MNIST; after that the notebook needs no network):
#
#     .venv/bin/pip install jupytext nbclient ipykernel   # in the dev extra: pip install -e '.[dev]'
#     .venv/bin/jupyter lab docs/tutorial.ipynb            # or any notebook front end
#
# It runs top to bottom in about two minutes on 2 CPU cores: it loads a small trained `scope` model shipped
# in `docs/models/scope/` instead of training one for minutes (section 5 shows the command, and trains a few
# steps to show the loop).
#
# **This file.** `docs/tutorial.py` (jupytext's percent format) is the source; `docs/tutorial.ipynb` is made
# from it with `jupytext --to ipynb docs/tutorial.py` and committed **without outputs**, on purpose: outputs
# are a few MB of images that would change with every run. Run it to see them. `tests/test_tutorial.py` runs
# the whole notebook and checks that the .ipynb matches the .py.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display

import vitscope
from vitscope import PRESETS, ViT, load_run
from vitscope.data import load_dataset, normalize

torch.manual_seed(0)
torch.set_num_threads(2)
HERE = Path.cwd() if (Path.cwd() / "models" / "scope").is_dir() else Path.cwd() / "docs"
SCOPE_MODEL = HERE / "models" / "scope"  # the shipped scope run: config.json, metrics.jsonl, model.safetensors
print("vitscope", vitscope.__version__, "| torch", torch.__version__)

# %% [markdown]
# ## 1. An image cut into patches
#
# A transformer reads a sequence of tokens. The ViT's tokens are image patches: a 28x28 MNIST digit cut into
# non-overlapping 4x4 patches gives a 7x7 grid, **49 patches** of 16 pixels each. (The blog and vitscope's
# `seed` preset use 7x7 patches: a 4x4 grid of 16 patches. The finer grid of the `scope` preset is what lets
# the paper's findings show; section 6.)

# %%
mnist = load_dataset("mnist")  # uint8 tensors: train_images (60000, 28, 28), test_images (10000, 28, 28)
image = mnist.test_images[0]  # a 7
P = 4
grid = 28 // P

# (28, 28) -> (7, 4, 7, 4) -> (7, 7, 4, 4): patch (row, column), then its pixels
patches = image.reshape(grid, P, grid, P).permute(0, 2, 1, 3)
assert patches.shape == (grid, grid, P, P)
sequence = patches.reshape(grid * grid, P * P)  # the token sequence, patches in row-major order
assert sequence.shape == (49, 16)

fig, axes = plt.subplots(1, 2, figsize=(8, 4), gridspec_kw={"width_ratios": [1, 1]})
axes[0].imshow(image, cmap="gray")
axes[0].set_title(f"a test digit, label {mnist.test_labels[0].item()}")
for k in range(1, grid):
    axes[0].axhline(k * P - 0.5, color="tab:orange", lw=0.8)
    axes[0].axvline(k * P - 0.5, color="tab:orange", lw=0.8)
# the same patches, pulled apart
gap = np.full((grid * (P + 1), grid * (P + 1)), 60, dtype=np.uint8)
for r in range(grid):
    for c in range(grid):
        gap[r * (P + 1):r * (P + 1) + P, c * (P + 1):c * (P + 1) + P] = patches[r, c].numpy()
axes[1].imshow(gap, cmap="gray")
axes[1].set_title("its 49 patches of 4x4 pixels")
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. The patch embedding
#
# Each flattened patch (16 pixels) is projected linearly to `dim` numbers: a learned 16 -> 64 matrix shared by
# all patches. vitscope stores it, as timm does, as a convolution whose kernel and stride are the patch size:
# the same thing. Here is the `scope` preset's architecture, untrained for now.

# %%
config = PRESETS["scope"].model
print(config)
model = ViT(config).eval()
x = normalize(image[None], config.pixel_mean, config.pixel_std)  # (1, 1, 28, 28), scaled as in training
with torch.no_grad():
    embedded = model.patch_embed(x)  # (B, N, D)
assert embedded.shape == (1, 49, config.dim)

# by hand: flatten each patch and apply the matrix
by_hand = normalize(sequence[None], config.pixel_mean, config.pixel_std).reshape(1, 49, 16) \
    @ model.patch_embed.proj.weight.reshape(config.dim, 16).T + model.patch_embed.proj.bias
torch.testing.assert_close(embedded, by_hand)
# and as the strided convolution it is stored as
as_conv = torch.nn.functional.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=P)
torch.testing.assert_close(embedded, as_conv.flatten(2).transpose(1, 2))
print("patch embedding:", tuple(x.shape), "->", tuple(embedded.shape))

# %% [markdown]
# ## 3. The class token and the position embeddings
#
# Like BERT's `[CLS]`, a learned vector is put in front of the sequence; what it holds after the last block is
# the image's representation, which the classification head reads. Attention itself ignores order (it is a
# weighted sum over a *set*), so a learned **position embedding**, one vector per place (50 of them: the class
# token's and 49 patches'), is added. It is 1D: number *i* for the *i*-th token, with nothing telling the model
# that patch 8 sits under patch 1. Whether it learns the 2D layout anyway is one of the paper's figures.

# %%
with torch.no_grad():
    tokens = model.tokens(x)  # class token + patch embeddings + position embeddings
assert model.cls_token.shape == (1, 1, config.dim)
assert model.pos_embed.shape == (1, 49 + 1, config.dim)
assert tokens.shape == (1, 50, config.dim)
by_hand = torch.cat([model.cls_token, embedded], dim=1) + model.pos_embed
torch.testing.assert_close(tokens, by_hand)
print("tokens:", tuple(tokens.shape), "(batch, 1 class token + 49 patches, dim)")

# %% [markdown]
# ## 4. One encoder block
#
# The encoder is `depth` identical blocks, each, with layer norm *before* each part (pre-norm) and a residual
# connection around it:
#
#     x = x + MSA(LN(x))      multi-head self-attention: every token looks at every token
#     x = x + MLP(LN(x))      the same two-layer MLP (GELU) on every token alone
#
# In one head, each token's query is compared with every token's key; a softmax turns the scores, scaled by
# 1/sqrt(head size), into weights that sum to 1; the token's output is the weighted sum of the values. The
# heads run in parallel on slices of `dim`, and their outputs are concatenated and projected.

# %%
block = model.blocks[0]
with torch.no_grad():
    out, attention = block(tokens, return_attention=True)
H, d = config.heads, config.dim // config.heads
assert out.shape == tokens.shape  # a block keeps the shape: blocks stack
assert attention.shape == (1, H, 50, 50)  # (batch, heads, queries, keys)
torch.testing.assert_close(attention.sum(-1), torch.ones(1, H, 50))  # every query's weights sum to 1

# the same attention, written out
with torch.no_grad():
    q, k, v = block.attn.qkv(block.norm1(tokens)).reshape(1, 50, 3, H, d).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
    weights = (q @ k.transpose(-2, -1) / d ** 0.5).softmax(dim=-1)
    mixed = (weights @ v).transpose(1, 2).reshape(1, 50, config.dim)  # heads side by side
    after_attention = tokens + block.attn.proj(mixed)
    by_hand = after_attention + block.mlp(block.norm2(after_attention))
torch.testing.assert_close(weights, attention)
torch.testing.assert_close(out, by_hand)
print(f"block: {tuple(tokens.shape)} -> {tuple(out.shape)}; attention {tuple(attention.shape)}: "
      f"{H} heads of size {d}")

# %% [markdown]
# After the last block, a layer norm and a linear head on the class token give 10 logits, one per digit. The
# untrained model guesses:

# %%
with torch.no_grad():
    print("logits:", model(x).numpy().round(2), "-> predicted", model(x).argmax().item())

# %% [markdown]
# ## 5. Training the `scope` model
#
# The `scope` preset is the paper's plain ViT on the 7x7 grid, sized and trained so that what the paper saw in
# ImageNet models shows in an MNIST one. Its recipe (`vitscope train --help`, `src/vitscope/config.py`):

# %%
print(PRESETS["scope"].description)

# %% [markdown]
# The full training is one command (407 s on one thread of a 2-core Intel Xeon, `docs/performance.md#scope-preset`),
# and `vitscope analyze` then draws the paper's figures into the run:
#
#     vitscope train --preset scope --out runs/scope
#     vitscope analyze runs/scope
#
# Here the same training loop runs a handful of steps on 2,048 images, to show it working; then we load the
# model the full command made, shipped with this tutorial.

# %%
import dataclasses  # noqa: E402
import tempfile  # noqa: E402

from vitscope.config import RuntimeConfig  # noqa: E402
from vitscope.train import train  # noqa: E402

scratch = Path(tempfile.mkdtemp(prefix="vitscope-tutorial-"))
preset = PRESETS["scope"]
few_steps = dataclasses.replace(preset.train, epochs=1, max_train_samples=2048)  # 8 steps of 256 images
demo = train(preset.model, few_steps, scratch / "scope-demo", preset="scope", progress=False,
             runtime=RuntimeConfig(compile="off", precision="fp32"))
print(demo.read_metrics()[-1])

# %%
model, config = load_run(SCOPE_MODEL)
metrics = vitscope.RunDir(SCOPE_MODEL).read_metrics()
print(f"shipped scope model: {sum(m['seconds'] for m in metrics):.0f} s of training, "
      f"test accuracy {metrics[-1]['test_acc']:.2%} after epoch {metrics[-1]['epoch']}")

# %% [markdown]
# ## 6. The paper's figures, from this model
#
# `vitscope analyze` computes the numbers behind the paper's Fig. 6 and 7 over the test images and draws them;
# the same functions are in `vitscope.analysis` for your own use. Each figure comes with the reference value you
# need to read it, and the report says in words what it shows for this run next to the paper's ImageNet
# figures.

# %%
import json  # noqa: E402

from vitscope.report import analyze_run, explain  # noqa: E402

# on the first 2,000 test images, to keep the notebook quick (`vitscope analyze` uses all 10,000)
analysis_dir = analyze_run(SCOPE_MODEL, out=scratch / "scope-analysis", log=lambda *a: None, images=2000)
analysis = json.loads((analysis_dir / "analysis.json").read_text())
words = explain(analysis)
print(f"test accuracy {analysis['test']['test_acc']:.2%}")


def show(name: str) -> None:
    display(Image(filename=str(analysis_dir / "plots" / name)))
    if name in words:
        print(words[name])


# %% [markdown]
# ### Patch-embedding filters (paper Fig. 7 left)
#
# The rows of the patch-embedding matrix are filters over a patch's 16 pixels. Their principal components show
# what the embedding picks out of a patch: in the paper, basis functions for the fine structure inside a
# patch, like a CNN's first-layer filters.

# %%
show("embedding_filters.png")

# %% [markdown]
# ### Position embeddings (paper Fig. 7 centre)
#
# Tile (r, c) shows how similar the position embedding of the patch at row r, column c is to every other
# patch's. In the paper, close patches have similar embeddings, and patches in the same row or column are
# more similar than the rest: the 1D embeddings learned the image's 2D grid. The title gives the mean
# similarity of same-row, same-column and other pairs: the reference for "more similar".
#
# Look at the inner tiles for the bright spot at the tile's own place and the streaks along its row and column.
# The outer ring is MNIST's own: border patches are (nearly) always empty, so the model has only one thing to
# learn about them, "this is the border", and their embeddings end up alike.

# %%
show("position_similarity.png")

# %% [markdown]
# ### Mean attention distance (paper Fig. 7 right)
#
# For one head and one query patch, the attention-weighted mean distance (in pixels) to the patches it
# attends to; averaged over queries and images it is the head's "receptive field". A head that attends to
# every patch equally has the dashed line's distance. In the paper's ViT-L/16, early layers hold some heads
# that attend locally (far below the line) and some that already look at the whole image; later layers are
# global.
#
# On MNIST the border patches are empty: a query there has nothing of its own to look at, and attends to the
# digit in the middle, which counts as "far". The right panel averages over queries on ink patches only,
# against their own uniform reference.

# %%
show("attention_distance.png")

# %% [markdown]
# You can compute the distances yourself from the attention weights of any batch:

# %%
from vitscope.analysis import ink_patches, mean_attention_distance, uniform_attention_distance  # noqa: E402

batch = mnist.test_images[:256]
with torch.no_grad():
    _, attentions = model(normalize(batch, config.pixel_mean, config.pixel_std), return_attention=True)
distances = mean_attention_distance(attentions, grid, P)  # (layers, heads) in pixels
uniform = uniform_attention_distance(grid, P)
print(f"uniform attention: {uniform:.1f} px; each head as a multiple of it (rows = layers):")
print((distances / uniform).numpy().round(2))
ink = ink_patches(batch, P)
ink_distances = mean_attention_distance(attentions, grid, P, ink) / uniform_attention_distance(grid, P, ink)
print("over queries on ink patches only:")
print(ink_distances.numpy().round(2))

# %% [markdown]
# ### Attention rollout (paper Fig. 6)
#
# Which patches does the prediction draw on? Attention rollout (Abnar & Zuidema 2020) multiplies the
# attention of all layers, heads averaged and the residual connection added as an identity, and reads the
# class token's row.

# %%
show("attention_rollout.png")

# %% [markdown]
# ## 7. Rollout on a digit you pick or draw
#
# Set `PICK` to any test image index, or edit the strokes of `DRAWN` (points on a 100x100 canvas). The drawn
# digit is preprocessed as `vitscope predict` does, the way MNIST was made (crop to the ink, scale to 20 px,
# centre by mass).

# %%
from PIL import Image as PILImage  # noqa: E402
from PIL import ImageDraw  # noqa: E402

from vitscope.analysis import attention_rollout, rollout_map  # noqa: E402
from vitscope.preprocess import mnist_style  # noqa: E402

PICK = 18
DRAWN = [[(30, 20), (70, 20), (45, 85)], [(38, 52), (65, 52)]]  # a crossed seven; try your own strokes

canvas = PILImage.new("L", (100, 100), 255)
pen = ImageDraw.Draw(canvas)
for stroke in DRAWN:
    pen.line(stroke, fill=0, width=9, joint="curve")
drawn = torch.from_numpy(mnist_style(canvas))
digits = torch.stack([mnist.test_images[PICK], drawn])

with torch.no_grad():
    logits, attentions = model(normalize(digits, config.pixel_mean, config.pixel_std), return_attention=True)
maps = rollout_map(attention_rollout(attentions), grid)  # (2, 7, 7), each summing to 1
fig, axes = plt.subplots(2, 2, figsize=(6, 6))
for i, title in enumerate([f"test image {PICK}", "your drawing"]):
    probabilities = logits[i].softmax(-1)
    axes[0, i].imshow(digits[i], cmap="gray")
    axes[0, i].set_title(f"{title}: {probabilities.argmax().item()} ({probabilities.max():.0%})")
    axes[1, i].imshow(maps[i], cmap="inferno", extent=(-0.5, 27.5, 27.5, -0.5))
    axes[1, i].contour(digits[i].numpy(), levels=[128], colors="cyan", linewidths=0.8)
    axes[1, i].set_title("rollout of the class token")
for ax in axes.flat:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 8. The blog's model beside the faithful ViT
#
# The seed blog's model looks like a ViT but differs in five places. vitscope keeps it, quirks and all, as
# the `blog` preset (`BlogViT`), so each quirk can be seen and measured:
#
# | | blog | faithful ViT (`seed` preset, same size) |
# |---|---|---|
# | class token | none: the first patch token (top-left corner) is classified | a learned token, read by the head |
# | position | `pos_embedding`, a `Linear` of the patch's pixels: no position at all | a learned vector per place |
# | attention scale | 1/sqrt(embedding size 32) | 1/sqrt(head size 8) |
# | MLP | ReLU | GELU |
# | loss | softmax, then `CrossEntropyLoss` (a second softmax) | logits into the loss |

# %%
from vitscope import BlogViT  # noqa: E402

blog, faithful = BlogViT(PRESETS["blog"].model).eval(), ViT(PRESETS["seed"].model).eval()
x7 = torch.zeros(1, 1, 28, 28)  # an empty image: every 7x7 patch is the same blank patch
with torch.no_grad():
    blog_tokens = blog.encoder(blog.patches(x7)) + blog.pos_embedding(blog.patches(x7))  # (1, 16, 32)
    faithful_tokens = faithful.tokens(x7)  # (1, 17, 32)
print("tokens: blog", tuple(blog_tokens.shape), "| faithful", tuple(faithful_tokens.shape), "(+ class token)")
# the blog's "position embedding" gives the blank patch at the top left and at the bottom right the same token
print("blank top-left == blank bottom-right?  blog:", torch.equal(blog_tokens[0, 0], blog_tokens[0, 15]),
      "| faithful:", torch.equal(faithful_tokens[0, 1], faithful_tokens[0, 16]))
print(f"attention scale: blog {blog.blocks[0].attn.scale:.3f}, faithful {faithful.blocks[0].attn.scale:.3f}")
# softmax before CrossEntropyLoss: even a perfect prediction cannot bring the loss below this
perfect = torch.tensor([[1.0] + [0.0] * 9])  # probabilities, fed to a loss that expects logits
print(f"the blog's loss for a perfect prediction: {torch.nn.functional.cross_entropy(perfect, torch.tensor([0])):.3f}"
      " (for logits it tends to 0): its gradients stay small and never vanish")

# %% [markdown]
# What each costs, measured (README, 20 epochs on all 60,000 images, seed 0): the blog's model and recipe
# reach **92.61%** test accuracy; the faithful ViT of the same size with the blog's exact recipe (Adam 3e-4,
# no augmentation) **97.27%**; with the `seed` preset's recipe **98.59%**; the `scope` model above, larger and
# on the finer grid, more (section 5). A short side-by-side you can run here (2 epochs on 10,000 images each,
# a minute on 2 cores; the exact numbers move with the seed):

# %%
side_by_side = {}
for name, model_config, recipe in [
        ("blog (all quirks)", PRESETS["blog"].model, PRESETS["blog"].train),
        ("faithful ViT, the blog's recipe", PRESETS["seed"].model, dataclasses.replace(
            PRESETS["blog"].train, softmax_before_loss=False))]:
    recipe = dataclasses.replace(recipe, epochs=2, max_train_samples=10_000)
    run = train(model_config, recipe, scratch / name.split()[0], progress=False, log=lambda *a, **k: None,
                runtime=RuntimeConfig(compile="off", precision="fp32"))
    side_by_side[name] = run.read_metrics()[-1]["test_acc"]
for name, accuracy in side_by_side.items():
    print(f"{name:35s} {accuracy:.2%}")

# %% [markdown]
# ## Exercises
#
# 1. **Patch size.** Build `ViT(dataclasses.replace(config, patch_size=7))` and redo sections 1-3: how many
#    tokens, and what does the uniform attention distance become (`uniform_attention_distance(4, 7)`)?
# 2. **Which heads are local?** In the distance table of section 6, pick the most local head of layer 1 and
#    show its attention map `attentions[0][i, head, 1:, 1:]` for one query patch on the digit, reshaped to
#    7x7. Then do the same for a query on an empty corner patch.
# 3. **Position embeddings at initialisation.** `analysis.similarity_by_relation` of an untrained
#    `ViT(config)`: how far above "other" are the same-row and same-column pairs before training?
# 4. **One quirk at a time.** In section 8, change one field at a time of the faithful model's recipe or
#    config toward the blog's (`softmax_before_loss=True`; `ViTConfig(architecture="blog")` changes the rest)
#    and measure what each costs.
# 5. **Train it yourself.** `vitscope train --preset scope --out runs/scope`, then `vitscope analyze runs/scope`
#    and open `runs/scope/report.html`. Does a second seed (`--seed 1`) show the same local heads?
