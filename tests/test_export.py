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
from safetensors.torch import load_file

from conftest import run_cli, synthetic_digits, write_idx_dataset
from vitscope import cli, load_run
from vitscope.config import RuntimeConfig, TrainConfig, ViTConfig
from vitscope.errors import VitscopeError
from vitscope.export import export_onnx
from vitscope.huggingface import save_hf_directory, vit_config_from_hf
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
    with torch.no_grad():
        expected, theirs = model(x), loaded(pixel_values=x).logits
    assert (theirs - expected).abs().max() < 1e-4 and expected.abs().max() > 0.5
    assert loaded.config.id2label == dict(enumerate(CLASSES))


def test_image_processor_normalises_a_grayscale_image_as_in_training(tmp_path):
    save_hf_directory(scrambled(TINY), TINY, tmp_path / "hf", CLASSES)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    pixels = synthetic_digits(1)[0][0]
    values = processor(pixels[None], return_tensors="pt")["pixel_values"]  # (1, H, W): one channel
    expected = (torch.from_numpy(pixels).float() / 255 - 0.2) / 0.4
    assert values.shape == (1, 1, 28, 28)
    assert torch.allclose(values[0, 0], expected, atol=1e-6)


def test_transformers_saved_model_survives_hf_vitscope_hf_exactly(tmp_path):
    hf_config = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=16,
                                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                       layer_norm_eps=1e-6, num_labels=4, hidden_act="gelu")
    torch.manual_seed(1)
    original = transformers.ViTForImageClassification(hf_config).eval()
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.copy_(torch.randn_like(parameter))
    original.save_pretrained(tmp_path / "theirs")

    model, config = load_run(tmp_path / "theirs")
    x = images(7)
    with torch.no_grad():
        assert (model(x) - original(pixel_values=x).logits).abs().max() < 1e-4
    save_hf_directory(model, config, tmp_path / "back", [str(i) for i in range(4)])
    back = assert_loads_cleanly(tmp_path / "back")
    theirs, ours = original.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[name], ours[name]) for name in theirs)


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
