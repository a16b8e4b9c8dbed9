"""Export a run's model for other tools: an ONNX file for onnxruntime, and a Hugging Face `transformers`
ViTForImageClassification directory. Each export is checked where it lands: the exported model is run in
onnxruntime or transformers and its logits are compared with PyTorch's.

onnx, onnxscript, onnxruntime and transformers are optional (`pip install 'vitscope[export]'`) and
imported only here, only when asked for.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .config import ViTConfig
from .errors import VitscopeError
from .extras import require
from .huggingface import GRAYSCALE_KEY, require_representable, save_hf_directory
from .model import count_parameters
from .rundir import RunDir, load_run

# Opset 18 has every op the model needs (LayerNormalization since 17; GELU is written as Erf, attention as
# MatMul/Softmax) and runs in any onnxruntime that reads the IR version 10 files torch writes (1.18 on).
ONNX_OPSET = 18
TOLERANCE = 1e-4  # max |logit difference| an export may have against PyTorch
CHECK_BATCH = 7  # images in the check; not 2, the batch the ONNX graph was traced with


@dataclass
class ExportResult:
    path: Path
    runtime: str  # what ran the exported model in the check, with its version
    max_difference: float  # max |logit difference| against PyTorch on CHECK_BATCH random images


def class_names(config: ViTConfig) -> list[str]:
    # IDX datasets (MNIST and its kin) name classes only by their label index; for MNIST it is the digit.
    return [str(i) for i in range(config.num_classes)]


def _check_inputs(config: ViTConfig) -> torch.Tensor:
    """Normalised-looking random images (B, C, H, W); seeded so a failed check can be repeated."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(CHECK_BATCH, config.in_channels, config.image_size, config.image_size, generator=generator)


def onnx_metadata(config: ViTConfig) -> dict[str, str]:
    """What a deployment needs besides the graph: how to make `pixel_values` and what the outputs mean."""
    return {
        "pixel_values": f"(B, {config.in_channels}, {config.image_size}, {config.image_size}) float32: "
                        "(pixel / 255 - pixel_mean) / pixel_std, images as in the training set",
        "pixel_mean": repr(config.pixel_mean),
        "pixel_std": repr(config.pixel_std),
        "class_names": json.dumps(class_names(config)),
        "architecture": config.architecture,
        "producer": f"vitscope {__version__}",
    }


def export_onnx(model: torch.nn.Module, config: ViTConfig, out: str | Path) -> ExportResult:
    """One .onnx file: input `pixel_values` with a dynamic batch axis, output `logits`, metadata_props
    holding the normalisation and class names."""
    _, _, onnxruntime = require("export", "exporting", "onnx", "onnxscript", "onnxruntime")
    out = Path(out)
    if out.is_dir():
        raise VitscopeError(f"--out {out} is a directory; name the .onnx file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().float().eval()
    # Traced with batch 2: torch.export specialises a dimension of size 1 to a constant.
    example = torch.zeros(2, config.in_channels, config.image_size, config.image_size)
    # The exporter logs about optional torchvision ops and warns about its own internals' deprecations:
    # nothing a user can act on, so keep it off their terminal.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            program = torch.onnx.export(model, (example,), input_names=["pixel_values"], output_names=["logits"],
                                        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                        opset_version=ONNX_OPSET, dynamo=True, verbose=False)
    finally:
        exporter_log.setLevel(level)
    program.model.metadata_props.update(onnx_metadata(config))
    program.save(out, external_data=False)  # one self-contained file; our models are far below protobuf's 2 GB

    images = _check_inputs(config)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixel_values": images.numpy()})
    return _checked(out, f"onnxruntime {onnxruntime.__version__}", torch.from_numpy(logits), model, images)


def model_card(model: torch.nn.Module, config: ViTConfig, run: RunDir) -> str:
    """README.md for the Hub: what the model is, its test accuracy from the run's metrics.jsonl, how to use it."""
    record = run.read_config()
    dataset = record.get("dataset", {})
    metrics = run.read_metrics()
    if metrics:
        last = metrics[-1]
        test_size = f" on {dataset['test_size']:,} test images" if "test_size" in dataset else ""
        result = (f"Test accuracy **{last['test_acc']:.2%}** (test loss {last['test_loss']:.4f}){test_size} "
                  f"after epoch {last['epoch']}, the weights exported here.")
    else:
        result = "Test accuracy: not recorded (the model was exported from a directory without metrics.jsonl)."
    name = dataset.get("name", "an MNIST-format dataset")
    if "preset" in record:  # a vitscope run directory, not a Hugging Face directory exported again
        provenance = (f"Trained with vitscope {record['vitscope_version']} (preset `{record['preset']}`, seed "
                      f"{record['seed']}) on {name}.")
    else:
        provenance = f"Exported by vitscope {__version__} from a Hugging Face directory."
    on_mnist = name == "mnist"
    tags = ["vitscope", "vision-transformer", "image-classification"] + (["mnist"] if on_mnist else [])
    front = ["---", "library_name: transformers", "pipeline_tag: image-classification", "tags:"]
    front += [f"- {tag}" for tag in tags]
    front += (["datasets:", "- ylecun/mnist"] if on_mnist else []) + ["metrics:", "- accuracy", "---", ""]
    size = config.image_size
    ink = "with white ink on black, as MNIST's" if on_mnist else "like the training images"
    body = f"""# Vision Transformer for {size}x{size} {'MNIST digits' if on_mnist else 'images'}, made with vitscope

A ViT as in Dosovitskiy et al. 2020 ("An Image is Worth 16x16 Words"): {config.patch_size}x{config.patch_size} \
patches ({config.num_patches} tokens and a class token), width {config.dim}, depth {config.depth}, \
{config.heads} heads, MLP {config.mlp_dim}; {count_parameters(model):,} parameters.
{provenance}

{result}

## Use

```python
from transformers import pipeline

classify = pipeline("image-classification", model="path/to/this/directory")
print(classify("digit.png"))  # [{{'label': '7', 'score': ...}}, ...], top 5
```

or, for the logits:

```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("path/to/this/directory")
model = AutoModelForImageClassification.from_pretrained("path/to/this/directory")
inputs = processor(Image.open("digit.png"), return_tensors="pt")
print(model.config.id2label[model(**inputs).logits.argmax(-1).item()])
```

The model was trained on grayscale {size}x{size} images {ink}. It takes RGB, as every image pipeline gives it:
its patch filters are the grayscale ones spread over red, green and blue in the proportions of PIL's
`convert("L")` (0.299, 0.587, 0.114; recorded in config.json as `{GRAYSCALE_KEY}`), so a grey image gets the
trained model's own logits and a colour image those of its luma. The processor converts the image to RGB,
resizes it to {size}x{size} (bilinear), scales pixels to [0, 1] and normalises them with mean
{config.pixel_mean} and std {config.pixel_std}, as in training; it does not centre or crop a digit (`vitscope
predict` does MNIST's preprocessing for any image file).

Back into vitscope: `vitscope.load_run("path/to/this/directory")` returns the same one-channel model.
"""
    return "\n".join(front) + body


def export_hf(model: torch.nn.Module, config: ViTConfig, out: str | Path, run: RunDir) -> ExportResult:
    """A directory transformers' ViTForImageClassification.from_pretrained loads with no missing or unexpected
    weights, plus a preprocessor config for AutoImageProcessor and a model card."""
    out = Path(out)
    if out.is_file():
        raise VitscopeError(f"--out {out} is a file; name a directory to write the Hugging Face model into")
    require_representable(config)
    (transformers,) = require("export", "exporting", "transformers")
    save_hf_directory(model, config, out, class_names(config))
    (out / "README.md").write_text(model_card(model, config, run))

    # transformers draws a progress bar per load; in a one-line command it is noise.
    bar_was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        loaded, info = transformers.ViTForImageClassification.from_pretrained(out, output_loading_info=True)
    finally:
        if bar_was_enabled:
            transformers.utils.logging.enable_progress_bar()
    problems = {kind: names for kind, names in info.items() if names}
    if problems:
        raise RuntimeError(f"transformers {transformers.__version__} loaded {out} with {problems}")
    images = _check_inputs(config)
    # A grayscale model reads RGB there: the grey images, each channel the same, as convert("RGB") makes them.
    rgb = images.expand(-1, loaded.config.num_channels, -1, -1)
    with torch.no_grad():
        logits = loaded.eval()(pixel_values=rgb).logits
    return _checked(out, f"transformers {transformers.__version__}", logits, model, images)


def _checked(path: Path, runtime: str, logits: torch.Tensor, model: torch.nn.Module,
             images: torch.Tensor) -> ExportResult:
    with torch.no_grad():
        expected = model(images)
    difference = (logits - expected).abs().max().item()
    if not difference <= TOLERANCE:  # a bug in the export, not a user error: keep the traceback
        raise RuntimeError(f"{path} computes logits {difference:.2e} away from PyTorch's in {runtime}")
    return ExportResult(path, runtime, difference)


def export_run(run_path: str | Path, format: str, out: str | Path) -> ExportResult:
    """Export the model of a run directory (or of a Hugging Face directory) as `format` ("onnx" or "hf")."""
    model, config = load_run(run_path)
    if format == "onnx":
        return export_onnx(model, config, out)
    if format == "hf":
        return export_hf(model, config, out, RunDir(run_path))
    raise VitscopeError(f"unknown export format {format!r}: choose onnx or hf")
