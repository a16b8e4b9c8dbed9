import json
import logging
import os
import pickle
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run_cli, synthetic_digits, write_idx_dataset
from vitscope import cli, load_run
from vitscope.config import RuntimeConfig, TrainConfig, ViTConfig
from vitscope.errors import VitscopeError
from vitscope.export import export_onnx, export_run
from vitscope.huggingface import hf_config as hf_config_record
from vitscope.huggingface import preprocessor_config, save_hf_directory, to_hf_state_dict, vit_config_from_hf
from vitscope.model import BlogViT, build_model
from vitscope.rundir import RunDir
from vitscope.train import train

TINY = ViTConfig(patch_size=7, dim=16, depth=2, heads=2, mlp_dim=32, num_classes=4, pixel_mean=0.2, pixel_std=0.4)
CLASSES = [str(i) for i in range(TINY.num_classes)]


def scrambled(config: ViTConfig, seed: int = 0, runtime: RuntimeConfig | None = None) -> torch.nn.Module:
    """A model whose every weight is O(1) noise: at init (std 0.02) all logits are near zero and a wrong mapping
    of q/k/v, heads or norms could still pass a 1e-4 check; here it cannot."""
    torch.manual_seed(seed)
    model = build_model(config, runtime).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    return model


def images(batch: int, config: ViTConfig = TINY) -> torch.Tensor:
    return torch.randn(batch, config.in_channels, config.image_size, config.image_size,
                       generator=torch.Generator().manual_seed(batch))


def load_in_transformers(directory: Path):
    """ViTForImageClassification.from_pretrained, with every warning transformers logs collected."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = transformers.ViTForImageClassification.from_pretrained(directory, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, [record.getMessage() for record in records]


def assert_loads_cleanly(directory: Path):
    model, info, warnings = load_in_transformers(directory)
    assert all(not names for names in info.values()), info  # no missing, unexpected or mismatched weights
    assert warnings == []
    return model


@pytest.mark.parametrize("config,runtime", [(TINY, RuntimeConfig(attention="fused")),
                                            (TINY, RuntimeConfig(attention="explicit")),
                                            (replace(TINY, architecture="blog"), RuntimeConfig())],
                         ids=["vit-fused-attention", "vit-explicit-attention", "blog"])
def test_onnx_logits_equal_pytorchs_for_batch_sizes_1_and_7(config, runtime, tmp_path):
    model = scrambled(config, runtime=runtime)
    result = export_onnx(model, config, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    assert (given.name, returned.name) == ("pixel_values", "logits")
    assert isinstance(given.shape[0], str) and given.shape[1:] == [1, 28, 28]  # the batch axis is dynamic
    for batch in (1, 7):
        x = images(batch)
        (logits,) = session.run(["logits"], {"pixel_values": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert logits.shape == (batch, 4)
        assert np.abs(logits - expected).max() < 1e-4
        assert np.abs(expected).max() > 0.5  # the check compares real signal, not near-zero logits
    assert result.max_difference < 1e-4


def test_onnx_metadata_holds_normalisation_and_class_names(tmp_path):
    export_onnx(scrambled(TINY), TINY, tmp_path / "model.onnx")
    metadata = {p.key: p.value for p in onnx.load(tmp_path / "model.onnx").metadata_props}
    assert float(metadata["pixel_mean"]) == 0.2 and float(metadata["pixel_std"]) == 0.4
    assert json.loads(metadata["class_names"]) == CLASSES
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["pixel_mean"] == "0.2"


def test_hugging_face_directory_loads_without_missing_weights_and_gives_the_same_logits(tmp_path):
    model = scrambled(TINY)
    save_hf_directory(model, TINY, tmp_path / "hf", CLASSES)
    loaded = assert_loads_cleanly(tmp_path / "hf")
    assert not hasattr(loaded.vit, "pooler") or loaded.vit.pooler is None  # the class token feeds the head
    x = images(7)
    with torch.no_grad():  # a grey image made RGB: each channel the same
        expected, theirs = model(x), loaded(pixel_values=x.expand(-1, 3, -1, -1)).logits
    assert (theirs - expected).abs().max() < 1e-4 and expected.abs().max() > 0.5
    assert loaded.config.id2label == dict(enumerate(CLASSES))


def test_image_processor_normalises_a_grayscale_image_as_in_training_in_each_rgb_channel(tmp_path):
    save_hf_directory(scrambled(TINY), TINY, tmp_path / "hf", CLASSES)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    pixels = synthetic_digits(1)[0][0]
    values = processor(Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    expected = (torch.from_numpy(pixels).float() / 255 - 0.2) / 0.4
    assert values.shape == (1, 3, 28, 28)
    for channel in values[0]:
        assert torch.allclose(channel, expected, atol=1e-6)


def test_grayscale_model_is_written_with_its_filters_spread_over_rgb_in_luma_proportions(tmp_path):
    model = scrambled(TINY)
    save_hf_directory(model, TINY, tmp_path / "hf", CLASSES)
    record = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert record["num_channels"] == 3 and record["vitscope_grayscale_weights"] == [0.299, 0.587, 0.114]
    filters = load_file(str(tmp_path / "hf" / "model.safetensors"))[
        "vit.embeddings.patch_embeddings.projection.weight"]  # (D, 3, P, P)
    grey = model.patch_embed.proj.weight.detach()  # (D, 1, P, P)
    for channel, weight in enumerate((0.299, 0.587, 0.114)):
        assert torch.allclose(filters[:, channel], grey[:, 0] * weight, rtol=1e-5, atol=1e-7)
    # summed in channel order the three give the grey filters back bit for bit
    assert torch.equal(filters[:, 0:1] + filters[:, 1:2] + filters[:, 2:3], grey)


def test_processor_and_model_classify_grey_and_colour_pil_images_as_vitscope_does_their_luma(tmp_path):
    model = scrambled(TINY)
    save_hf_directory(model, TINY, tmp_path / "hf", CLASSES)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    # Luma computed here in float (PIL's convert("L") would round it to whole grey levels).
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    for image, pixels in ((Image.fromarray(grey), grey.astype(np.float64)), (Image.fromarray(rgb), luma)):
        inputs = processor(image, return_tensors="pt")
        with torch.no_grad():
            theirs = loaded(**inputs).logits
            ours = model(((torch.from_numpy(pixels) / 255 - 0.2) / 0.4).float()[None, None])
        assert (theirs - ours).abs().max() < 1e-4 and ours.abs().max() > 0.5


@pytest.mark.parametrize("channels", [1, 3])
def test_transformers_saved_model_survives_hf_vitscope_hf(channels, tmp_path):
    hf_config = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=channels, hidden_size=16,
                                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                       layer_norm_eps=1e-6, num_labels=4, hidden_act="gelu")
    torch.manual_seed(1)
    original = transformers.ViTForImageClassification(hf_config).eval()
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.copy_(torch.randn_like(parameter))
    original.save_pretrained(tmp_path / "theirs")

    model, config = load_run(tmp_path / "theirs")
    assert config.in_channels == channels
    x = images(7, replace(TINY, in_channels=channels))
    with torch.no_grad():
        assert (model(x) - original(pixel_values=x).logits).abs().max() < 1e-4
    save_hf_directory(model, config, tmp_path / "back", [str(i) for i in range(4)])
    back = assert_loads_cleanly(tmp_path / "back")
    theirs, ours = original.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys()
    filters = "vit.embeddings.patch_embeddings.projection.weight"
    assert all(torch.equal(theirs[name], ours[name]) for name in theirs if name != filters)
    if channels == 3:  # an RGB model stays as it is
        assert torch.equal(theirs[filters], ours[filters])
    else:  # a grayscale one now reads RGB, and gives its logits for a grey image made RGB
        assert ours[filters].shape[1] == 3 and torch.equal(ours[filters].sum(1, keepdim=True), theirs[filters])
        with torch.no_grad():
            assert (back(pixel_values=x.expand(-1, 3, -1, -1)).logits - original(pixel_values=x).logits
                    ).abs().max() < 1e-4


def test_hugging_face_directory_of_an_earlier_one_channel_export_still_loads(tmp_path):
    model = scrambled(TINY)
    hf = tmp_path / "hf"
    hf.mkdir()
    # What vitscope wrote before grayscale models were spread over RGB: one channel, one mean and std.
    record = {**hf_config_record(TINY, CLASSES), "num_channels": 1}
    del record["vitscope_grayscale_weights"]
    (hf / "config.json").write_text(json.dumps(record))
    (hf / "preprocessor_config.json").write_text(json.dumps(
        {**preprocessor_config(TINY), "image_mean": [0.2], "image_std": [0.4], "do_convert_rgb": False}))
    save_file(to_hf_state_dict(model.state_dict(), TINY.depth), str(hf / "model.safetensors"),
              metadata={"format": "pt"})
    loaded, config = load_run(hf)
    assert config == TINY
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_vitscope_hf_vitscope_round_trip_is_exact(tmp_path):
    model = scrambled(TINY)
    save_hf_directory(model, TINY, tmp_path / "hf", CLASSES)
    loaded, config = load_run(tmp_path / "hf")
    assert config == TINY
    original, back = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(original[name], back[name]) for name in original)
    save_hf_directory(loaded, config, tmp_path / "again", CLASSES)
    first, second = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(
        str(tmp_path / "again" / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    for name in ("config.json", "preprocessor_config.json"):
        assert (tmp_path / "hf" / name).read_text() == (tmp_path / "again" / name).read_text()


@pytest.mark.parametrize("field,value", [("layer_norm_eps", 1e-12), ("hidden_act", "gelu_new"), ("qkv_bias", False)])
def test_hugging_face_vits_our_model_cannot_compute_exactly_are_refused(field, value, tmp_path):
    save_hf_directory(scrambled(TINY), TINY, tmp_path / "hf", CLASSES)
    config_file = tmp_path / "hf" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), field: value}))
    with pytest.raises(VitscopeError, match=field):
        load_run(tmp_path / "hf")


def test_fields_a_transformers_config_json_leaves_out_take_transformers_defaults():
    # transformers 4 writes only the fields that differ from its ViTConfig defaults.
    config = vit_config_from_hf({"model_type": "vit", "layer_norm_eps": 1e-6}, None)
    assert (config.image_size, config.patch_size, config.in_channels, config.dim, config.depth, config.heads,
            config.mlp_dim, config.num_classes) == (224, 16, 3, 768, 12, 12, 3072, 2)
    assert config.pixel_mean == config.pixel_std == 0.5  # ViTImageProcessor's defaults


def test_blog_model_exports_to_onnx_but_hugging_face_refuses_it(tmp_path):
    config = replace(TINY, architecture="blog")
    model = scrambled(config)
    assert isinstance(model, BlogViT)
    assert export_onnx(model, config, tmp_path / "blog.onnx").max_difference < 1e-4
    with pytest.raises(VitscopeError, match="cannot represent the 'blog' architecture"):
        save_hf_directory(model, config, tmp_path / "hf", CLASSES)
    assert not (tmp_path / "hf").exists()


class CreatesDirectory:
    """A pickle payload: unpickling it calls os.mkdir(path), i.e. runs code of the file's author's choosing."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_payload_of_a_malicious_pickle_is_real(tmp_path):
    # The control for the tests below: unpickled freely, this payload does run.
    pickle.loads(pickle.dumps(CreatesDirectory(tmp_path / "pwned")))
    assert (tmp_path / "pwned").is_dir()


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    run = RunDir(tmp_path / "run")
    run.checkpoint_file.parent.mkdir(parents=True)
    torch.save({"model": CreatesDirectory(tmp_path / "pwned")}, run.checkpoint_file)
    with pytest.raises(VitscopeError, match="cannot load checkpoint"):
        run.load_checkpoint()
    assert not (tmp_path / "pwned").exists()


def test_pickled_weights_are_never_loaded(tmp_path):
    payload = {"classifier.weight": CreatesDirectory(tmp_path / "pwned")}
    torch.save(payload, tmp_path / "pytorch_model.bin")
    with pytest.raises(VitscopeError, match="is a file"):
        load_run(tmp_path / "pytorch_model.bin")
    # A Hugging Face directory with only pickled weights: refused, and the pickle is not opened.
    hf = tmp_path / "hf"
    save_hf_directory(scrambled(TINY), TINY, hf, CLASSES)
    (hf / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").rename(hf / "pytorch_model.bin")
    with pytest.raises(VitscopeError, match="pytorch_model.bin, a pickle"):
        load_run(hf)
    assert not (tmp_path / "pwned").exists()


def test_no_module_unpickles_freely():
    # Safe loading everywhere: torch.load only with weights_only=True, no plain pickle.load(s).
    source = Path(__file__).parents[1] / "src" / "vitscope"
    for path in source.glob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert not re.search(r"pickle\.loads?\(", text), path.name


def test_missing_export_packages_are_named_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(VitscopeError, match=r"onnxruntime package: pip install 'vitscope\[export\]'"):
        export_onnx(scrambled(TINY), TINY, tmp_path / "model.onnx")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real run directory: TINY trained for 2 epochs on a synthetic 4-class IDX set."""
    root = tmp_path_factory.mktemp("export")
    data = write_idx_dataset(root / "idx", n_train=256, n_test=64)
    recipe = TrainConfig(epochs=2, batch_size=32, lr=2e-3, dataset="idx", data_dir=str(data))
    return train(TINY, recipe, root / "run", progress=False, log=lambda *a, **k: None,
                 runtime=RuntimeConfig(precision="fp32", device="cpu")).path


def test_cli_exports_a_run_to_onnx(tiny_run, tmp_path, capsys):
    assert cli.main(["export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "max |logit difference| from PyTorch" in capsys.readouterr().out
    model, config = load_run(tiny_run)
    assert config.num_classes == 4  # from the IDX files
    pixels, _ = synthetic_digits(7, seed=5)
    x = ((torch.from_numpy(pixels).float() / 255 - config.pixel_mean) / config.pixel_std)[:, None]
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        assert np.abs(logits - model(x).numpy()).max() < 1e-4


def test_cli_exports_a_run_to_hugging_face_with_a_model_card(tiny_run, tmp_path):
    p = run_cli("export", tiny_run, "--format", "hf", "--out", tmp_path / "hf")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no progress bars or warnings from the exporters
    assert assert_loads_cleanly(tmp_path / "hf").config.num_labels == 4
    last = RunDir(tiny_run).read_metrics()[-1]
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"Test accuracy **{last['test_acc']:.2%}**" in card and "on 64 test images" in card
    assert card.startswith("---\nlibrary_name: transformers\n")
    model, _ = load_run(tiny_run)
    back, _ = load_run(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_cli_refuses_hugging_face_export_of_the_blog_model_in_one_line(tmp_path):
    config = replace(TINY, architecture="blog")
    run = RunDir(tmp_path / "blog")
    run.write_config({"model": asdict(config)})
    run.save_weights(BlogViT(config))
    p = run_cli("export", run.path, "--format", "hf", "--out", tmp_path / "hf")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "cannot represent the 'blog' architecture" in p.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow  # real MNIST: from the cache, else fetched
def test_image_classification_pipeline_on_mnist_is_as_accurate_as_vitscope(tmp_path):
    from vitscope.data import load_dataset
    from vitscope.evaluate import logits_of, scores
    from vitscope.prediction import BUNDLED_RUN

    export_run(BUNDLED_RUN, "hf", tmp_path / "hf")
    test = load_dataset("mnist")
    pixels, labels = test.test_images[:1000], test.test_labels[:1000]
    model, config = load_run(BUNDLED_RUN)
    logits = logits_of(model, pixels, config.pixel_mean, config.pixel_std)
    ours = scores(logits, labels)

    classify = transformers.pipeline("image-classification", model=str(tmp_path / "hf"))
    answers = classify([Image.fromarray(image) for image in pixels.numpy()], top_k=1, batch_size=100)
    predictions = torch.tensor([int(answer[0]["label"]) for answer in answers])
    assert torch.equal(predictions, logits.argmax(1))
    assert (predictions == labels).float().mean().item() == ours["test_acc"] > 0.97
