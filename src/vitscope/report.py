"""`vitscope analyze`: from a run directory to the paper's figures, analysis.json and one self-contained
report.html. Everything comes from the run directory (config, weights, metrics, the dataset it names)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch

from . import __version__
from .analysis import (
    CLASS_TOKEN_TREATMENT,
    INK_THRESHOLD,
    attention_rollout,
    class_token_attention,
    confusion_matrix,
    embedding_principal_components,
    ink_patches,
    mean_attention_distance,
    position_similarity,
    rollout_map,
    similarity_by_relation,
    uniform_attention_distance,
)
from .config import ViTConfig
from .data import normalize
from .evaluate import scores
from .figures import (
    plot_attention_distance,
    plot_attention_rollout,
    plot_confusion_matrix,
    plot_embedding_filters,
    plot_misclassified,
    plot_position_similarity,
)
from .model import BlogViT
from .plots import plot_training_curves
from .rundir import RunDir, load_run

ROLLOUT_DIGITS = 12
MISCLASSIFIED_SHOWN = 24
NO_POSITION_EMBEDDING = ("The blog model has no position embedding: its \"pos_embedding\" is a Linear of\n"
                         "the patch's pixels, so it encodes what is in a patch, not where the patch is.\n"
                         "Its attention is blind to the patches' order.")

# How to read each figure: shown under it in report.html.
CAPTIONS = {
    "embedding_filters.png": "The first principal components of the linear patch embedding's filters (paper "
    "Fig. 7 left), each shown as a patch-sized image with the share of the filters' variance it explains. "
    "Smooth blobs, edges and stroke-like components mean the embedding has learned a low-dimensional basis "
    "for the pixels inside a patch, like a CNN's first layer.",
    "position_similarity.png": "Tile (r, c) shows how similar the position embedding of the patch in row r, "
    "column c is to every other patch's (paper Fig. 7 centre). A bright spot at the tile's own place that "
    "fades with distance means the model learned 2D image topology from 1D embeddings; bright rows or "
    "columns mean it learned row and column structure.",
    "attention_distance.png": "For each head (a dot) of each layer, how far in pixels its attention reaches on "
    "average, like a CNN's receptive field size (paper Fig. 7 right). Heads far below the dashed line attend "
    "locally; heads near it spread their attention over the whole image.",
    "attention_rollout.png": "Attention rollout (Abnar & Zuidema 2020, paper Fig. 6): the attention of every "
    "layer, heads averaged and the residual connection added, multiplied through the network, read at the "
    "token the classifier sees. Bright regions are the patches the prediction draws on most; where that "
    "token is a patch (the blog model's first), its own patch is bright through the residual connection.",
    "confusion_matrix.png": "Test images counted by true class (row) and predicted class (column); the "
    "diagonal is correct. Off-diagonal cells (red numbers) show which digits the model confuses.",
    "misclassified.png": "The test images the model got wrong with the most confidence, with their true and "
    "predicted label and the probability it gave its prediction. Some are label noise or ambiguous "
    "handwriting; the others show what the model has not learned.",
    "accuracy.png": "Train and test accuracy per epoch.",
    "loss.png": "Train and test loss per epoch.",
}


LOCAL, GLOBAL = 0.6, 0.8  # a head is called local at <= 0.6x uniform attention's distance, global at >= 0.8x


def _layers(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def _describe_distances(over_uniform: list[list[float]], uniform: float, queries: str) -> str:
    """Plain words for one panel of attention_distance.png: the first third of the layers, the last layer, and
    the most local head anywhere."""
    layers = len(over_uniform)
    early = max(1, round(layers / 3))
    first = [r for row in over_uniform[:early] for r in row]
    last = over_uniform[-1]
    lo, hi = min(first), max(first)
    if lo <= LOCAL and hi >= GLOBAL:
        verdict = "both local and global heads, as in the paper's early layers"
    elif lo <= LOCAL:
        verdict = "local heads but none that spread over the whole image"
    elif lo < GLOBAL:
        verdict = (f"heads part-way to local but none at or below {LOCAL}x uniform, so not the paper's local "
                   "heads")
    else:
        verdict = f"no local head (none at or below {LOCAL}x uniform), unlike the paper's early layers"
    if min(last) >= GLOBAL:
        late = f"every head of layer {layers} is global ({min(last):.2f}-{max(last):.2f}x), as in the paper"
    else:
        late = (f"layer {layers}'s heads range {min(last):.2f}-{max(last):.2f}x: some stay local, unlike the "
                "paper's last layers, where every head is global")
    value, layer, head = min((r, i + 1, h + 1) for i, row in enumerate(over_uniform) for h, r in enumerate(row))
    return (f"Over {queries}, against uniform attention's {uniform:.1f} px, {_layers(1, early)} reach "
            f"{lo:.2f}-{hi:.2f}x uniform: {verdict}; {late}. The most local head is head {head} of layer {layer} "
            f"({value:.2f}x).")


def explain(analysis: dict) -> dict[str, str]:
    """What each figure shows for this run, in plain words, next to what the paper's ImageNet figures show
    (ViT-L/16 and ViT-L/32 trained on JFT-300M, Fig. 6 and 7): shown under the figure in report.html."""
    words = {}
    pcs = analysis["embedding_principal_components"]["explained_variance_ratio"]
    words["embedding_filters.png"] = (
        f"Here the first 4 components explain {sum(pcs[:4]):.0%} of the filters' variance, the first 16 "
        f"{sum(pcs[:16]):.0%}. In the paper (ViT-L/32 on 32x32 RGB patches) the top components look like smooth "
        "basis functions for the fine structure inside a patch; on a few-pixel digit patch, expect blobs, "
        "edges and stroke pieces at a few orientations.")
    relation = (analysis["position_similarity"] or {}).get("mean_by_relation")
    if relation is None:
        words["position_similarity.png"] = ("This model has no position embedding to compare with the paper's "
                                            "Fig. 7 centre.")
    else:
        row, column = relation["same_row"] - relation["other"], relation["same_column"] - relation["other"]
        learned = [name for name, gap in (("rows", row), ("columns", column)) if gap >= 0.1]
        verdict = (f"this run learned {' and '.join(learned)}" if learned else
                   "this run kept little row or column structure: the embeddings are still close to their "
                   "random start, or the model tells places apart some other way")
        words["position_similarity.png"] = (
            f"Two positions in the same row have a mean cosine similarity of {relation['same_row']:+.2f}, in the "
            f"same column {relation['same_column']:+.2f}, in neither {relation['other']:+.2f}: same-row pairs "
            f"stand {row:+.2f} above the others and same-column pairs {column:+.2f}, so {verdict}. The paper's "
            "ImageNet ViTs learn the image's 2D layout from 1D embeddings: each position is most like its "
            "neighbours, and like the rest of its row and column.")
    distance = analysis["mean_attention_distance"]
    ink = distance["ink_queries"]
    words["attention_distance.png"] = (
        "In the paper (ViT-L/16), some heads of the first layers attend within a few patches while others "
        "already spread over the whole image, and deeper layers are all global. "
        + _describe_distances(distance["per_layer_and_head_over_uniform"], distance["uniform_attention"],
                              "every patch query")
        + " " + _describe_distances(ink["per_layer_and_head_over_uniform"], ink["uniform_attention"],
                                    f"the queries on ink patches, {ink['share_of_patches']:.0%} of the patches")
        + " On MNIST an empty border patch has nothing of its own to look at and attends to the digit in the "
        "middle, which reads as global; the ink panel leaves those queries out.")
    rollout = analysis["attention_rollout"]
    words["attention_rollout.png"] = (
        f"Over these digits the rollout puts {rollout['share_on_ink_patches']:.0%} of its weight on the patches "
        f"that hold ink, which are {rollout['ink_share_of_patches']:.0%} of the patches"
        + (": the prediction draws on the digit, as the paper's Fig. 6 maps fall on the object."
           if rollout["share_on_ink_patches"] > 1.5 * rollout["ink_share_of_patches"] else
           ": the prediction draws on the background about as much as on the digit, unlike the paper's Fig. 6, "
           "where the maps fall on the object."))
    return words


def sample_per_class(labels: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of `count` test images, taken class by class in turn, so every class shows up at least once."""
    by_class = [torch.nonzero(labels == k).flatten() for k in range(int(labels.max()) + 1)]
    picks = []
    for rank in range(max(len(indices) for indices in by_class)):
        picks += [indices[rank].item() for indices in by_class if rank < len(indices)]
    return torch.tensor(picks[:count], dtype=torch.long)


@torch.inference_mode()
def attention_statistics(model: torch.nn.Module, images: torch.Tensor, config: ViTConfig,
                         batch_size: int = 500, device: torch.device | str = "cpu"):
    """One pass over all `images`, in batches: fp32 logits (N, classes) on the CPU, mean attention distance
    (L, H) over all patch queries and over the queries on ink patches only (analysis.ink_patches), and
    class-token attention (L, H) or None."""
    was_training = model.training
    model.eval()
    grid = config.image_size // config.patch_size
    distance_sum, ink_sum, ink_count, class_sum, logits = 0.0, 0.0, 0, 0.0, []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        batch_logits, attentions = model(normalize(batch.to(device), config.pixel_mean, config.pixel_std),
                                         return_attention=True)
        logits.append(batch_logits.float().cpu())
        attentions = [a.float().cpu() for a in attentions]
        distance_sum = distance_sum + mean_attention_distance(attentions, grid, config.patch_size) * len(batch)
        ink = ink_patches(batch, config.patch_size)
        if ink.any():
            ink_sum = ink_sum + mean_attention_distance(attentions, grid, config.patch_size, ink) * ink.sum()
            ink_count += ink.sum().item()
        share = class_token_attention(attentions, grid)
        class_sum = None if share is None else class_sum + share * len(batch)
    model.train(was_training)
    return (torch.cat(logits), distance_sum / len(images), ink_sum / max(ink_count, 1),
            None if class_sum is None else class_sum / len(images))


@torch.inference_mode()
def rollout_maps(model: torch.nn.Module, images: torch.Tensor, config: ViTConfig,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, grid, grid) attention rollout of the token the classifier reads, for a few images."""
    x = normalize(images.to(device), config.pixel_mean, config.pixel_std)
    _, attentions = model(x, return_attention=True)
    return rollout_map(attention_rollout([a.float().cpu() for a in attentions]),
                       config.image_size // config.patch_size)


def _rounded(tensor: torch.Tensor, digits: int = 4):
    return [[round(v, digits) for v in row] for row in tensor.tolist()] if tensor.dim() == 2 else \
        [round(v, digits) for v in tensor.tolist()]


def analyze_run(run_path: str | Path, out: str | Path | None = None, device: torch.device | str = "cpu",
                data_dir: str | None = None, log=print, images: int | None = None) -> Path:
    """Write OUT/plots/*.png, OUT/analysis.json and OUT/report.html for the run; OUT is the run itself
    unless `out` names another folder. `images` limits the analysis to the first that many test images
    (all by default). Returns OUT."""
    run = RunDir(run_path).require()
    dataset = run.dataset(data_dir)  # first: an exported model directory has no dataset, and says so
    model, config = load_run(run.path, device)
    out = Path(out) if out is not None else run.path
    plots = out / "plots"
    grid = config.image_size // config.patch_size
    images, labels = dataset.test_images[:images], dataset.test_labels[:images]
    is_blog = isinstance(model, BlogViT)

    log(f"analyzing {run.path} on {len(labels)} test images ({dataset.name})")
    # The forward pass that yields the attention weights also gives the logits: one pass over the test set.
    logits, distances, ink_distances, class_share = attention_statistics(model, images, config, device=device)
    probabilities = logits.softmax(dim=1)
    confidences, predictions = probabilities.max(dim=1)
    test = scores(logits, labels)
    matrix = confusion_matrix(labels, predictions, config.num_classes)

    uniform = uniform_attention_distance(grid, config.patch_size)  # what uniform attention would give
    ink = ink_patches(images, config.patch_size)
    ink_uniform = uniform_attention_distance(grid, config.patch_size, ink)
    components, explained = embedding_principal_components(model)
    similarity = None if is_blog else position_similarity(model)
    by_relation = None if similarity is None else similarity_by_relation(similarity, grid)
    samples = sample_per_class(labels, max(ROLLOUT_DIGITS, config.num_classes))
    maps = rollout_maps(model, images[samples], config, device)
    rollout_on_ink = (maps.flatten(1) * ink[samples]).sum(dim=1).mean().item()
    wrong = torch.nonzero(predictions != labels).flatten()
    worst = wrong[confidences[wrong].argsort(descending=True)][:MISCLASSIFIED_SHOWN]
    reader = "first patch token (top left, which the blog model classifies)" if is_blog else "class token"
    class_token = "none, every token is a patch and a query" if is_blog else CLASS_TOKEN_TREATMENT

    plot_embedding_filters(components, explained, plots / "embedding_filters.png")
    plot_position_similarity(similarity, grid, plots / "position_similarity.png", NO_POSITION_EMBEDDING,
                             by_relation)
    plot_attention_distance([("every patch query (the paper's measure)", distances, uniform),
                             ("queries on ink patches only", ink_distances, ink_uniform)],
                            plots / "attention_distance.png", config.patch_size, len(labels), class_token)
    plot_attention_rollout(images[samples], maps, labels[samples], predictions[samples],
                           plots / "attention_rollout.png", reader)
    plot_confusion_matrix(matrix, plots / "confusion_matrix.png")
    plot_misclassified(images[worst], labels[worst], predictions[worst], confidences[worst],
                       plots / "misclassified.png", len(wrong))

    analysis = {
        "run": str(run.path.resolve()),
        "vitscope_version": __version__,
        "architecture": config.architecture,
        "dataset": dataset.name,
        "test": test,
        "confusion_matrix": {"rows": "true class", "columns": "predicted class", "counts": matrix.tolist()},
        "mean_attention_distance": {
            "unit": "pixels",
            "images": len(labels),
            "class_token": class_token,
            "per_layer_and_head": _rounded(distances, 3),
            "per_layer_mean": _rounded(distances.mean(dim=1), 3),
            "uniform_attention": round(uniform, 3),
            "per_layer_and_head_over_uniform": _rounded(distances / uniform, 3),
            "patch_size": config.patch_size,
            "grid": grid,
            "ink_queries": {
                "meaning": f"queries on patches with at least {INK_THRESHOLD:.0%} of their pixels at >= 128 only "
                           "(an empty border patch that attends to the digit reads as global otherwise); "
                           "uniform_attention is these queries' mean distance to every patch",
                "share_of_patches": round(ink.double().mean().item(), 4),
                "per_layer_and_head": _rounded(ink_distances, 3),
                "uniform_attention": round(ink_uniform, 3),
                "per_layer_and_head_over_uniform": _rounded(ink_distances / ink_uniform, 3)},
        },
        "class_token_attention": None if class_share is None else {
            "meaning": "mean attention weight patch queries put on the class token, per layer and head",
            "per_layer_and_head": _rounded(class_share)},
        "embedding_principal_components": {
            "filters": config.dim,
            "filter_shape": [config.in_channels, config.patch_size, config.patch_size],
            "explained_variance_ratio": _rounded(explained)},
        "position_similarity": None if similarity is None else {
            "cosine_similarity": _rounded(similarity),
            "mean_by_relation": {k: round(v, 4) for k, v in by_relation.items()}},
        "attention_rollout": {"reads": reader, "test_indices": samples.tolist(),
                              "share_on_ink_patches": round(rollout_on_ink, 4),
                              "ink_share_of_patches": round(ink[samples].double().mean().item(), 4)},
        "misclassified": [{"test_index": i, "true": labels[i].item(), "predicted": predictions[i].item(),
                           "confidence": round(confidences[i].item(), 4)} for i in worst.tolist()],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(analysis, indent=2) + "\n")

    curves = [run.plots / "accuracy.png", run.plots / "loss.png"]
    metrics = run.read_metrics()
    if metrics and not all(p.is_file() for p in curves):
        curves = plot_training_curves(metrics, plots, title=f"{run.read_config().get('preset', '')} "
                                      f"({config.architecture})")
    write_report(out / "report.html", run, analysis, metrics, [p for p in curves if p.is_file()], plots)
    log(f"wrote {plots}/ (6 figures), {out / 'analysis.json'}, {out / 'report.html'}")
    return out


# ---- report.html ---------------------------------------------------------------------------------

STYLE = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}
th{background:#f4f4f4}td.k{text-align:left;font-family:monospace}figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#444;max-width:760px}
.cols{display:flex;gap:2em;flex-wrap:wrap}.big{font-size:1.1em}"""


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _figure(path: Path, words: dict[str, str] | None = None) -> str:
    """The image, how to read it, and what it shows for this run (`words`, from `explain`)."""
    shows = (words or {}).get(path.name)
    this_run = f"<br><b>This run:</b> {html.escape(shows)}" if shows else ""
    return f"<figure>{_image(path)}<figcaption>{html.escape(CAPTIONS[path.name])}{this_run}</figcaption></figure>"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=k" if i == 0 else ""}>{html.escape(str(v))}</td>'
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(path: Path, run: RunDir, analysis: dict, metrics: list[dict], curves: list[Path],
                 plots: Path) -> Path:
    """One HTML page with everything inline (images as base64, no remote resources), readable offline."""
    record = run.read_config()
    test = analysis["test"]
    distance = analysis["mean_attention_distance"]
    config_rows = [[f"{section}.{k}", json.dumps(v)] for section in ("model", "train")
                   for k, v in record.get(section, {}).items()]
    config_rows += [[k, json.dumps(record[k])] for k in ("preset", "seed", "created", "precision", "hardware",
                                                          "versions", "dataset") if k in record]
    columns = list(metrics[0]) if metrics else []
    metrics_table = _table(columns, [[_number(row.get(c)) for c in columns] for row in metrics]) if metrics \
        else "<p>No metrics.jsonl in this run.</p>"
    layer_rows = [[f"layer {i + 1}", *(f"{d:.1f}" for d in row), f"{mean:.1f}"]
                  for i, (row, mean) in enumerate(zip(distance["per_layer_and_head"], distance["per_layer_mean"]))]
    heads = len(distance["per_layer_and_head"][0])
    words = explain(analysis)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vitscope report: {html.escape(run.path.name)}</title>
<style>{STYLE}</style></head><body>
<h1>vitscope report: {html.escape(str(run.path))}</h1>
<p class="big">{html.escape(record.get('preset', 'custom'))} preset, {html.escape(analysis['architecture'])}
architecture: test accuracy <b>{test['test_acc']:.2%}</b>, test loss {test['test_loss']:.4f} on {test['n']}
{html.escape(analysis['dataset'])} test images.</p>
<h2>Training</h2>
<div class="cols">{''.join(_figure(p) for p in curves)}</div>
{metrics_table}
<h2>What the model learned (paper Fig. 7)</h2>
{_figure(plots / 'embedding_filters.png', words)}
{_figure(plots / 'position_similarity.png', words)}
{_figure(plots / 'attention_distance.png', words)}
<p>Mean attention distance in pixels over {distance['images']} test images (uniform attention:
{distance['uniform_attention']:.1f} px). Class token: {html.escape(distance['class_token'])}.</p>
{_table(['', *(f'head {h + 1}' for h in range(heads)), 'mean'], layer_rows)}
<h2>Where it looks (paper Fig. 6)</h2>
{_figure(plots / 'attention_rollout.png', words)}
<h2>Errors</h2>
{_figure(plots / 'confusion_matrix.png')}
{_figure(plots / 'misclassified.png')}
<h2>Configuration</h2>
{_table(['field', 'value'], config_rows)}
<p style="color:#888;font-size:.8em">vitscope {__version__}; the numbers behind the figures are in
analysis.json beside this page.</p>
</body></html>
"""
    path.write_text(page)
    return path
