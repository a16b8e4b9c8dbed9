"""Inference on users' own images: preprocess them as MNIST was made, then classify them in one batch.

`vitscope.predict(model, images)` is the Python API; `predict_files` is what `vitscope predict` runs: it
collects a per-file error instead of stopping at the first bad file. With no model named, the small seed
model that ships in `vitscope/bundled/` is used, so prediction works before any training.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .errors import VitscopeError
from .evaluate import logits_of
from .preprocess import ImageRejected, decode_image, mnist_style, read_image
from .rundir import load_run

BUNDLED_RUN = Path(__file__).parent / "bundled"


class Prediction(NamedTuple):
    label: int
    probs: list[float]  # one per class, summing to 1


def load_model(model: torch.nn.Module | str | Path | None = None) -> torch.nn.Module:
    """A model as given, or loaded in eval mode from a run directory, or (None) the bundled model."""
    if isinstance(model, torch.nn.Module):
        return model
    return load_run(BUNDLED_RUN if model is None else model)[0]


ImageSource = Image.Image | str | Path | bytes | np.ndarray


def to_pil(image: ImageSource) -> Image.Image:
    """A PIL image from a PIL image, a file path, a file's bytes, or an array (H, W) or (H, W, 3|4): uint8,
    uint16, or floats in [0, 1]. Raises ImageRejected for a file or array that cannot be used."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0:
        raise ImageRejected(f"an array image must be (H, W) or (H, W, 3 or 4), not {array.shape}")
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array)  # 16-bit grayscale, scaled by preprocessing
    if array.dtype == np.uint16:
        # 16-bit colour: PIL has no such mode, so it is scaled to 8 bits here (65535 -> 255); clipped at 255
        # instead, all but the darkest pixels would be full white, and the digit gone.
        return Image.fromarray((array / 257).round().astype(np.uint8))
    if array.dtype != np.uint8:
        floats = array.astype(np.float32)
        # Floats in [0, 1] (the usual for arrays), anything else taken as 0..255.
        array = np.clip(floats * 255 if floats.max() <= 1 else floats, 0, 255).round().astype(np.uint8)
    return Image.fromarray(array)


def model_input_size(model: torch.nn.Module) -> int:
    config = model.config
    if config.in_channels != 1:
        raise VitscopeError(f"this model takes {config.in_channels}-channel images; predict handles grayscale "
                            "digit models")
    return config.image_size


def model_input(image: ImageSource, size: int) -> np.ndarray:
    """The uint8 (size, size) image the model sees for one user image, preprocessed MNIST-style. Raises
    ImageRejected for anything wrong with this one image, including errors nobody foresaw in a decoder:
    Pillow's six decoders are a large surface, a crafted file can make them raise almost anything (IndexError,
    ZeroDivisionError, MemoryError, ...), and that is one file's problem, not the whole call's."""
    try:
        return mnist_style(to_pil(image), size)
    except ImageRejected:
        raise
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ImageRejected(f"cannot read this image ({type(e).__name__}{': ' + detail if detail else ''})") from None


def classify(model: torch.nn.Module, inputs: np.ndarray) -> torch.Tensor:
    """Preprocessed uint8 images (N, S, S) -> class probabilities (N, num_classes), fp32 on the CPU."""
    device = next(model.parameters()).device
    config = model.config
    return logits_of(model, torch.from_numpy(inputs), config.pixel_mean, config.pixel_std, device=device).softmax(-1)


def predict(model: torch.nn.Module | str | Path | None, images: Sequence[ImageSource] | ImageSource
            ) -> list[Prediction]:
    """One Prediction(label, probs) per image. `model`: a loaded model, a run directory, or None for the
    bundled one. `images`: PIL images, file paths, files' bytes or arrays (or one of them); each is
    preprocessed MNIST-style. An image that cannot be used raises VitscopeError naming it."""
    model = load_model(model)
    if isinstance(images, (Image.Image, str, Path, bytes, bytearray, np.ndarray)):
        images = [images]
    size = model_input_size(model)
    inputs = []
    for index, image in enumerate(images):
        try:
            inputs.append(model_input(image, size))
        except ImageRejected as e:
            name = image if isinstance(image, (str, Path)) else f"image {index}"
            raise VitscopeError(f"{name}: {e}") from None
    if not inputs:
        return []
    probs = classify(model, np.stack(inputs))
    return [Prediction(int(p.argmax()), p.tolist()) for p in probs]


def predict_files(model: torch.nn.Module, paths: Iterable[str | Path]) -> list[dict]:
    """Per file, {"file", "label", "probs", "input" (the uint8 image the model saw)} or {"file", "error"}:
    a bad file is reported and the others are still predicted."""
    size = model_input_size(model)
    results, inputs = [], []
    for path in paths:
        try:
            inputs.append(model_input(Path(path), size))
            results.append({"file": str(path)})
        except ImageRejected as e:
            results.append({"file": str(path), "error": str(e)})
    if inputs:
        predicted = zip(inputs, classify(model, np.stack(inputs)))
        for result in results:
            if "error" not in result:
                image, p = next(predicted)
                result.update(label=int(p.argmax()), probs=p.tolist(), input=image)
    return results


def save_inputs(results: list[dict], folder: str | Path) -> list[Path]:
    """Write each predicted file's model input as FOLDER/<name>.png (a numbered suffix if names repeat)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for result in results:
            if "input" not in result:
                continue
            stem, n = Path(result["file"]).stem, 1
            target = folder / f"{stem}.png"
            while target in written:
                n += 1
                target = folder / f"{stem}-{n}.png"
            Image.fromarray(result["input"]).save(target)
            written.append(target)
    except OSError as e:
        raise VitscopeError(f"cannot write preprocessed images to {folder}: {e.strerror or e}") from None
    return written
