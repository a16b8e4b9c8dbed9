import json
import math
import re

import pytest
import torch

from conftest import run_cli
from vitscope import BlogViT, RuntimeConfig, TrainConfig, ViT, ViTConfig, VitscopeError
from vitscope.analysis import (
    attention_rollout,
    class_token_attention,
    confusion_matrix,
    embedding_principal_components,
    ink_patches,
    mean_attention_distance,
    position_embeddings,
    position_similarity,
    rollout_map,
    similarity_by_relation,
    uniform_attention_distance,
)
from vitscope.report import analyze_run, explain
from vitscope.train import train

GRID, PATCH = 4, 7  # MNIST with 7x7 patches
N = GRID * GRID
TINY = ViTConfig(patch_size=7, dim=16, depth=2, heads=2, mlp_dim=32)


def tiny_run(idx_dir, folder, model: ViTConfig):
    recipe = TrainConfig(epochs=1, batch_size=32, lr=2e-3, dataset="idx", data_dir=str(idx_dir),
                         softmax_before_loss=model.architecture == "blog")
    return train(model, recipe, folder, progress=False, log=lambda *args, **kwargs: None,
                 runtime=RuntimeConfig(precision="fp32", device="cpu"))


def centre(index: int, grid: int, patch_size: int) -> tuple[float, float]:
    row, col = divmod(index, grid)
    return (row * patch_size + (patch_size - 1) / 2, col * patch_size + (patch_size - 1) / 2)


def distance(a: int, b: int, grid: int = GRID, patch_size: int = PATCH) -> float:
    (ra, ca), (rb, cb) = centre(a, grid, patch_size), centre(b, grid, patch_size)
    return math.hypot(ra - rb, ca - cb)


def attention_of(matrix: torch.Tensor, batch: int = 2, heads: int = 3) -> torch.Tensor:
    """One (T, T) attention matrix repeated over a batch and heads: (B, H, T, T)."""
    return matrix.expand(batch, heads, *matrix.shape).clone()


# ---- mean attention distance ---------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [N, N + 1], ids=["patches only", "with class token"])
def test_identity_attention_has_mean_distance_zero(tokens):
    distances = mean_attention_distance([attention_of(torch.eye(tokens))] * 2, GRID, PATCH)
    assert distances.shape == (2, 3)
    torch.testing.assert_close(distances, torch.zeros(2, 3))


@pytest.mark.parametrize("tokens", [N, N + 1], ids=["patches only", "with class token"])
def test_uniform_attention_gives_the_mean_pairwise_patch_centre_distance(tokens):
    expected = sum(distance(q, k) for q in range(N) for k in range(N)) / N ** 2
    uniform = attention_of(torch.full((tokens, tokens), 1 / tokens))
    distances = mean_attention_distance([uniform], GRID, PATCH)
    torch.testing.assert_close(distances, torch.full((1, 3), expected))
    assert 13 < expected < 15  # ~14.06 px for 7x7 patches on 28x28


def test_attention_to_one_corner_patch_gives_the_mean_distance_to_that_corner():
    corner = torch.zeros(N, N)
    corner[:, 0] = 1.0
    expected = sum(distance(q, 0) for q in range(N)) / N
    torch.testing.assert_close(mean_attention_distance([attention_of(corner)], GRID, PATCH),
                               torch.full((1, 3), expected))


def test_attention_to_the_class_token_is_dropped_and_the_rest_renormalised():
    # Every patch query puts 0.7 on the class token and 0.3 on the top-left patch: after dropping the class
    # token, all of its attention is on that patch.
    attention = torch.zeros(N + 1, N + 1)
    attention[:, 0], attention[:, 1] = 0.7, 0.3
    expected = sum(distance(q, 0) for q in range(N)) / N
    attentions = [attention_of(attention)]
    torch.testing.assert_close(mean_attention_distance(attentions, GRID, PATCH), torch.full((1, 3), expected))
    torch.testing.assert_close(class_token_attention(attentions, GRID), torch.full((1, 3), 0.7))
    assert class_token_attention([attention_of(torch.eye(N))], GRID) is None


def test_distance_scales_with_the_patch_size_and_is_per_head():
    heads = torch.stack([torch.eye(N), torch.full((N, N), 1 / N)])[None]  # head 1 local, head 2 uniform
    distances = mean_attention_distance([heads], GRID, 4)
    expected = sum(distance(q, k, GRID, 4) for q in range(N) for k in range(N)) / N ** 2
    torch.testing.assert_close(distances, torch.tensor([[0.0, expected]]))


def test_distance_over_marked_queries_averages_those_queries_only():
    corner = torch.zeros(N, N)
    corner[:, 0] = 1.0  # every query looks at the top-left patch
    queries = torch.zeros(2, N, dtype=torch.bool)
    queries[0, [5, N - 1]] = True  # image 1: two queries
    queries[1, 5] = True  # image 2: one
    expected = (2 * distance(5, 0) + distance(N - 1, 0)) / 3
    distances = mean_attention_distance([attention_of(corner)], GRID, PATCH, queries)
    torch.testing.assert_close(distances, torch.full((1, 3), expected))


def test_uniform_reference_over_marked_queries_is_their_mean_distance_to_every_patch():
    assert uniform_attention_distance(GRID, PATCH) == pytest.approx(
        sum(distance(q, k) for q in range(N) for k in range(N)) / N ** 2)
    queries = torch.zeros(1, N, dtype=torch.bool)
    queries[0, [5, 6]] = True  # two central patches: nearer to the rest than the average patch
    central = uniform_attention_distance(GRID, PATCH, queries)
    assert central == pytest.approx(sum(distance(q, k) for q in (5, 6) for k in range(N)) / (2 * N))
    assert central < uniform_attention_distance(GRID, PATCH)


def test_ink_patches_marks_the_patches_that_hold_enough_bright_pixels():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[0, 7:14, 14:21] = 255  # all of patch (1, 2)
    images[0, 0, 0] = 255  # one pixel of patch (0, 0): 2% of it, below the threshold
    images[1, 27, 27] = 127  # not bright enough
    marked = ink_patches(images, PATCH)
    assert marked.shape == (2, N)
    assert marked[0].nonzero().flatten().tolist() == [1 * GRID + 2] and not marked[1].any()
    assert ink_patches(images[:, None], PATCH).equal(marked)  # (B, 1, H, W) too


def test_token_count_that_fits_no_grid_is_refused():
    with pytest.raises(ValueError, match="tokens"):
        mean_attention_distance([attention_of(torch.eye(N + 2))], GRID, PATCH)


# ---- attention rollout ---------------------------------------------------------------------------

def test_rollout_of_identity_attention_is_identity():
    rollout = attention_rollout([attention_of(torch.eye(N + 1))] * 3)
    torch.testing.assert_close(rollout, torch.eye(N + 1).expand(2, -1, -1))


def test_rollout_averages_heads_adds_the_residual_and_multiplies_later_layers_on_the_left():
    T = 3
    shift = torch.eye(T)[[1, 2, 0]]  # token i attends to token i+1
    swap = torch.eye(T)[[1, 0, 2]]  # tokens 0 and 1 attend to each other
    layer1 = torch.stack([shift, torch.eye(T)])[None]  # two heads: mean (shift + I) / 2
    layer2 = torch.stack([swap, swap])[None]
    # By hand: a layer's rollout matrix is (mean of heads + I), rows renormalised.
    a1 = ((shift + torch.eye(T)) / 2 + torch.eye(T)) / 2
    a2 = (swap + torch.eye(T)) / 2
    rollout = attention_rollout([layer1, layer2])
    torch.testing.assert_close(rollout[0], a2 @ a1)
    assert not torch.allclose(a2 @ a1, a1 @ a2)  # the order is really tested
    torch.testing.assert_close(rollout.sum(-1), torch.ones(1, T))


def test_rollout_map_reads_the_class_token_row_over_patches_or_the_first_patch_row():
    rollout = torch.rand(2, N + 1, N + 1)
    maps = rollout_map(rollout, GRID)
    assert maps.shape == (2, GRID, GRID)
    torch.testing.assert_close(maps.flatten(1), rollout[:, 0, 1:] / rollout[:, 0, 1:].sum(-1, keepdim=True))
    blog = rollout_map(rollout[:, 1:, 1:], GRID)
    torch.testing.assert_close(blog.flatten(1), rollout[:, 1, 1:] / rollout[:, 1, 1:].sum(-1, keepdim=True))


# ---- embeddings ----------------------------------------------------------------------------------

def test_position_similarity_diagonal_is_one():
    torch.manual_seed(0)
    similarity = position_similarity(ViT(TINY))
    assert similarity.shape == (N, N)
    torch.testing.assert_close(similarity.diagonal(), torch.ones(N))
    torch.testing.assert_close(similarity, similarity.T)
    assert similarity.abs().max() <= 1 + 1e-6


def test_position_similarity_skips_the_class_token_and_measures_row_structure():
    model = ViT(TINY)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, 0, :] = 1.0  # the class token: must not show up
        for index in range(N):
            model.pos_embed[0, 1 + index, index // GRID] = 1.0  # embedding = one-hot of the row
    similarity = position_similarity(model)
    for a in range(N):
        for b in range(N):
            assert similarity[a, b].item() == pytest.approx(1.0 if a // GRID == b // GRID else 0.0, abs=1e-6)
    assert similarity_by_relation(similarity, GRID) == pytest.approx({"same_row": 1.0, "same_column": 0.0,
                                                                      "other": 0.0}, abs=1e-6)


def test_blog_model_has_no_position_embedding():
    model = BlogViT(ViTConfig(**{**TINY.__dict__, "architecture": "blog"}))
    assert position_embeddings(model) is None
    with pytest.raises(ValueError, match="no position embedding"):
        position_similarity(model)


def test_pca_of_filters_built_from_known_components_recovers_them():
    torch.manual_seed(0)
    config = ViTConfig(image_size=12, patch_size=4, dim=8, depth=1, heads=2, mlp_dim=16)
    components = torch.linalg.qr(torch.randn(16, 3))[0].T  # (3, 16) orthonormal
    coefficients = torch.randn(8, 3)
    coefficients = torch.linalg.qr(coefficients - coefficients.mean(0))[0]  # orthonormal, zero-mean columns
    strengths = torch.tensor([3.0, 2.0, 1.0])
    mean_filter = torch.randn(16)  # PCA must remove it
    filters = (coefficients * strengths) @ components + mean_filter  # (8, 16)
    for model in (ViT(config), BlogViT(ViTConfig(**{**config.__dict__, "architecture": "blog"}))):
        with torch.no_grad():
            if isinstance(model, ViT):
                model.patch_embed.proj.weight.copy_(filters.reshape(8, 1, 4, 4))
            else:  # the blog model's patch embedding is the sum of two Linears of the pixels
                model.pos_embedding.weight.copy_(torch.randn(8, 16))
                model.encoder.weight.copy_(filters - model.pos_embedding.weight)
        found, explained = embedding_principal_components(model)
        assert found.shape == (8, 1, 4, 4) and explained.shape == (8,)
        torch.testing.assert_close(explained[:3], strengths ** 2 / (strengths ** 2).sum())
        torch.testing.assert_close(explained[3:], torch.zeros(5), atol=1e-6, rtol=0)
        overlaps = (found[:3].reshape(3, 16) @ components.T).abs()  # sign is arbitrary
        torch.testing.assert_close(overlaps, torch.eye(3), atol=1e-5, rtol=0)


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion_matrix(labels, predicted, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_distances_of_a_real_model_are_per_layer_and_head_and_in_range():
    torch.manual_seed(0)
    model = ViT(TINY).eval()
    _, attentions = model(torch.randn(4, 1, 28, 28), return_attention=True)
    distances = mean_attention_distance(attentions, GRID, PATCH)
    assert distances.shape == (2, 2)
    assert (distances > 0).all() and (distances < distance(0, N - 1)).all()


# ---- vitscope analyze ----------------------------------------------------------------------------

FIGURES = ["embedding_filters.png", "position_similarity.png", "attention_distance.png", "attention_rollout.png",
           "confusion_matrix.png", "misclassified.png"]


def assert_analysis_written(out, depth, heads):
    for name in FIGURES:
        path = out / "plots" / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    analysis = json.loads((out / "analysis.json").read_text())
    distances = analysis["mean_attention_distance"]["per_layer_and_head"]
    assert len(distances) == depth and all(len(row) == heads for row in distances)
    assert analysis["mean_attention_distance"]["images"] == 128  # the whole synthetic test split
    assert sum(map(sum, analysis["confusion_matrix"]["counts"])) == 128
    assert 0 <= analysis["test"]["test_acc"] <= 1
    assert sum(analysis["embedding_principal_components"]["explained_variance_ratio"]) == pytest.approx(1, abs=1e-3)
    page = (out / "report.html").read_text()
    assert "<script" not in page and not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert page.count('src="data:image/png;base64,') == 8  # six figures and the two training curves
    return analysis


def test_analyze_writes_all_figures_json_and_report_into_the_run(idx_dir, tmp_path):
    run = tiny_run(idx_dir, tmp_path / "run", TINY)
    p = run_cli("analyze", run.path, "--device", "cpu")
    assert p.returncode == 0, p.stderr
    analysis = assert_analysis_written(run.path, depth=2, heads=2)
    assert len(analysis["position_similarity"]["cosine_similarity"]) == N
    assert set(analysis["position_similarity"]["mean_by_relation"]) == {"same_row", "same_column", "other"}
    distance = analysis["mean_attention_distance"]
    assert "class token" in distance["class_token"]
    ink = distance["ink_queries"]
    assert 0 < ink["share_of_patches"] < 1 and 0 < ink["uniform_attention"] < distance["uniform_attention"]
    assert len(ink["per_layer_and_head"]) == 2 and len(distance["per_layer_and_head_over_uniform"][0]) == 2
    page = (run.path / "report.html").read_text()
    assert page.count("<b>This run:</b>") == 4  # the four figures of the paper, each explained
    assert str(run.path / "report.html") in p.stdout


def test_analyze_of_a_blog_run_into_another_folder_redraws_missing_curves(idx_dir, tmp_path):
    blog = ViTConfig(**{**TINY.__dict__, "architecture": "blog"})
    run = tiny_run(idx_dir, tmp_path / "run", blog)
    for curve in run.plots.glob("*.png"):
        curve.unlink()
    p = run_cli("analyze", run.path, "--out", tmp_path / "out", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    analysis = assert_analysis_written(tmp_path / "out", depth=2, heads=2)
    assert analysis["position_similarity"] is None and analysis["class_token_attention"] is None
    assert analysis["mean_attention_distance"]["class_token"].startswith("none")
    assert (tmp_path / "out" / "plots" / "accuracy.png").is_file()
    assert not (run.path / "analysis.json").exists() and not list(run.plots.glob("*.png"))


def analysis_of(over_uniform, ink_over_uniform, relation, rollout_on_ink=0.6):
    """The parts of an analysis.json that `explain` reads."""
    return {"embedding_principal_components": {"explained_variance_ratio": [0.4, 0.2, 0.1, 0.1] + [0.01] * 20},
            "position_similarity": relation and {"mean_by_relation": relation},
            "mean_attention_distance": {"per_layer_and_head_over_uniform": over_uniform, "uniform_attention": 14.4,
                                        "ink_queries": {"per_layer_and_head_over_uniform": ink_over_uniform,
                                                        "uniform_attention": 12.3, "share_of_patches": 0.3}},
            "attention_rollout": {"share_on_ink_patches": rollout_on_ink, "ink_share_of_patches": 0.3}}


def test_explanation_names_local_and_global_heads_against_the_paper():
    paper_like = [[0.4, 0.95], [0.7, 0.9], [0.85, 0.9]]  # layer 1 local and global, the last all global
    flat = [[0.9, 0.95], [0.9, 0.9], [0.5, 0.9]]  # nothing local early, a local head last
    words = explain(analysis_of(paper_like, flat, {"same_row": 0.35, "same_column": 0.25, "other": 0.05}))
    distance = words["attention_distance.png"]
    every, ink = distance.split("Over the queries on ink")
    assert "layer 1 reach 0.40-0.95x uniform: both local and global heads, as in the paper" in every
    assert "every head of layer 3 is global (0.85-0.90x), as in the paper" in every
    assert "no local head" in ink and "some stay local" in ink
    position = words["position_similarity.png"]
    assert "stand +0.30 above the others and same-column pairs +0.20" in position
    assert "learned rows and columns" in position
    assert "draws on the digit" in words["attention_rollout.png"]
    unstructured = explain(analysis_of(paper_like, paper_like, {"same_row": 0.1, "same_column": 0.05,
                                                                "other": 0.04}, rollout_on_ink=0.3))
    assert "little row or column structure" in unstructured["position_similarity.png"]
    assert "background about as much" in unstructured["attention_rollout.png"]
    assert "no position embedding" in explain(analysis_of(flat, flat, None))["position_similarity.png"]


def test_analyze_of_a_missing_run_is_one_line_and_exit_2(tmp_path):
    p = run_cli("analyze", tmp_path / "nope")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "no run directory" in p.stderr


def test_analyze_refuses_a_folder_that_is_not_a_training_run(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')  # what an exported Hugging Face folder holds
    with pytest.raises(VitscopeError, match="not a training run"):
        analyze_run(tmp_path)
