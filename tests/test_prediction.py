"""`vitscope.predict` and `vitscope predict`: the bundled model, per-file errors, JSON, exit codes."""
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import vitscope
from conftest import run_cli
from test_preprocess import png_claiming
from vitscope import ViT, ViTConfig, VitscopeError
from vitscope.prediction import BUNDLED_RUN, Prediction, load_model


def drawn(digit: int, size=(160, 200)) -> Image.Image:
    """A 0, 1 or 7 drawn with a marker on white paper, as in a paint program."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    if digit == 0:
        draw.ellipse([40, 30, 120, 170], outline="black", width=12)
    elif digit == 1:
        draw.line([(85, 30), (80, 170)], fill="black", width=12)
    else:
        draw.line([(40, 40), (125, 40), (70, 170)], fill="black", width=12)
    return image


@pytest.fixture(scope="module")
def bundled():
    return load_model(None)


def test_the_bundled_model_is_a_finished_fast_run():
    config = json.loads((BUNDLED_RUN / "config.json").read_text())
    assert config["preset"] == "fast"
    assert (BUNDLED_RUN / "model.safetensors").stat().st_size < 3 * 2**20
    epochs = (BUNDLED_RUN / "metrics.jsonl").read_text().strip().splitlines()
    assert len(epochs) == config["train"]["epochs"]
    # trained with the recipe file its README names
    recipe = tomllib.loads((Path(__file__).parents[1] / "configs" / "bundled.toml").read_text())
    assert {key: config["train"][key] for key in recipe} == recipe


def test_bundled_model_reads_drawn_digits(bundled):
    predictions = vitscope.predict(bundled, [drawn(0), drawn(1), drawn(7)])
    assert [p.label for p in predictions] == [0, 1, 7]


def test_predict_takes_images_paths_and_arrays(bundled, tmp_path):
    path = tmp_path / "seven.webp"
    drawn(7).save(path)
    gray = np.asarray(drawn(7).convert("L"))
    images = [drawn(7), path, str(path), gray, gray.astype(np.float32) / 255, np.asarray(drawn(7))]
    predictions = vitscope.predict(bundled, images)
    assert len(predictions) == len(images)
    for prediction in predictions:
        assert isinstance(prediction, Prediction)
        label, probs = prediction
        assert len(probs) == 10 and sum(probs) == pytest.approx(1, abs=1e-5)
        assert label == int(np.argmax(probs)) == 7
    assert vitscope.predict(bundled, drawn(0))[0].label == 0  # one image, not in a list


def test_predict_without_a_model_uses_the_bundled_one():
    assert vitscope.predict(None, [drawn(1)])[0].label == 1


def test_predict_follows_the_models_input_size():
    model = ViT(ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, heads=2, mlp_dim=32))
    (prediction,) = vitscope.predict(model, [drawn(0)])
    assert len(prediction.probs) == 10


def test_a_bad_image_in_the_api_names_it(bundled, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    with pytest.raises(VitscopeError, match="notes.png: not an image"):
        vitscope.predict(bundled, [drawn(0), bad])
    with pytest.raises(VitscopeError, match="image 0: no ink"):
        vitscope.predict(bundled, [np.zeros((28, 28), np.uint8)])


def test_cli_json_predicts_good_files_and_reports_each_bad_one(tmp_path):
    good = tmp_path / "seven.jpg"
    drawn(7).save(good, quality=80)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "blank.png").write_bytes(b"")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(7000, 7000))  # between our limit and Pillow's default error: its warning zone
    files = [good, tmp_path / "notes.txt", tmp_path / "blank.png", bomb, tmp_path / "missing.png", tmp_path]
    p = run_cli("predict", *files, "--json", "--save-preprocessed", tmp_path / "seen")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr
    results = json.loads(p.stdout)
    assert [r["file"] for r in results] == [str(f) for f in files]
    assert results[0]["label"] == 7 and len(results[0]["probs"]) == 10 and "error" not in results[0]
    errors = [r["error"] for r in results[1:]]
    for error, words in zip(errors, ["not an image", "empty", "40 megapixels", "no such file", "directory"]):
        assert words in error, error
    assert all("label" not in r for r in results[1:])
    assert np.asarray(Image.open(tmp_path / "seen" / "seven.png")).shape == (28, 28)


def test_cli_text_shows_top_k_and_exits_0_when_all_files_are_read(tmp_path):
    files = []
    for digit in (0, 1):
        files.append(tmp_path / f"{digit}.png")
        drawn(digit).save(files[-1])
    p = run_cli("predict", *files, "--top-k", "2")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 2
    for digit, line in zip((0, 1), lines):
        assert line.startswith(f"{files[digit]}: {digit}") and line.count("%") == 2


def test_cli_missing_model_is_one_line(tmp_path):
    image = tmp_path / "0.png"
    drawn(0).save(image)
    p = run_cli("predict", "--model", tmp_path / "no-run", image)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "no run directory" in p.stderr


def test_sixteen_bit_colour_arrays_are_scaled_not_clipped(bundled):
    eight_bit = np.asarray(drawn(7)) // 2 + 60  # (H, W, 3) uint8: grey ink (60) on light grey paper (187)
    sixteen_bit = eight_bit.astype(np.uint16) * 257  # the same picture at 16 bits: every value over 255
    (prediction,) = vitscope.predict(bundled, [sixteen_bit])
    assert prediction.label == 7
    assert prediction.probs == pytest.approx(vitscope.predict(bundled, [eight_bit])[0].probs, abs=1e-6)


def test_predict_takes_a_files_bytes(bundled, tmp_path):
    path = tmp_path / "one.png"
    drawn(1).save(path)
    assert vitscope.predict(bundled, path.read_bytes())[0].label == 1


def test_an_unforeseen_decoder_error_is_that_files_error(bundled, tmp_path, monkeypatch):
    import vitscope.preprocess
    good, cursed = tmp_path / "seven.png", tmp_path / "cursed.png"
    drawn(7).save(good)
    drawn(0).save(cursed)
    real_open = vitscope.preprocess.Image.open

    def open_or_fail(fp, *args, **kwargs):
        if fp.getvalue() == cursed.read_bytes():
            raise IndexError("list index out of range")  # as a crafted file can make a Pillow plugin do
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(vitscope.preprocess.Image, "open", open_or_fail)
    results = vitscope.prediction.predict_files(bundled, [cursed, good])
    assert "IndexError" in results[0]["error"] and "label" not in results[0]
    assert results[1]["label"] == 7
    with pytest.raises(VitscopeError, match="cursed.png: cannot read this image"):
        vitscope.predict(bundled, [good, cursed])
