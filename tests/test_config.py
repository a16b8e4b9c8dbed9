"""The three configs: architecture, recipe and runtime, and config.json files of every vitscope version."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from vitscope import RuntimeConfig, TrainConfig, ViTConfig, load_run
from vitscope.config import PRESETS, SECTIONS, configs_from_record, field_names, read_config_file, resolve_config
from vitscope.fastpath import ClassTokenLastBlockViT
from vitscope.rundir import RunDir

# A run directory written by vitscope 0.1.0 before the runtime section existed (its attention, GELU and compile
# settings in its "model" and "train" sections), with the logits that version's load_run gave on a fixed input.
OLD_RUN = Path(__file__).parent / "data" / "run-0.1.0"


def test_every_field_belongs_to_exactly_one_config():
    names = [field_names(cls) for cls in SECTIONS.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert {"patch_size", "dim", "pos_embed_std", "pixel_mean"} <= field_names(ViTConfig)
    assert {"lr", "epochs", "augment_rotate", "seed", "dataset"} <= field_names(TrainConfig)
    assert {"device", "precision", "compile", "attention", "gelu", "bias_in_kernels"} <= field_names(RuntimeConfig)


def test_a_config_file_may_be_flat_or_in_model_train_and_runtime_tables(tmp_path):
    (tmp_path / "c.toml").write_text('lr = 0.01\n[model]\ndim = 48\nheads = 6\n[runtime]\nattention = "explicit"\n'
                                     'precision = "fp32"\n')
    model, recipe, runtime = resolve_config("fast", read_config_file(tmp_path / "c.toml"))
    assert (model.dim, model.heads, recipe.lr, runtime.attention, runtime.precision) == (48, 6, 0.01, "explicit",
                                                                                          "fp32")
    assert recipe.optimizer == PRESETS["fast"].train.optimizer  # the rest from the preset


def test_a_run_from_before_the_runtime_section_keeps_loading_with_its_settings_and_logits():
    model_config, recipe, runtime = RunDir(OLD_RUN).configs()
    assert (model_config.dim, model_config.depth, model_config.num_classes) == (16, 2, 4)
    assert (recipe.epochs, recipe.lr, recipe.dataset) == (1, 0.002, "idx")
    assert (runtime.attention, runtime.gelu, runtime.compile, runtime.precision, runtime.eval_batch_size) == (
        "explicit", "aten", "off", "fp32", 500)
    expected = torch.tensor(json.loads((OLD_RUN / "logits.json").read_text())["logits"])
    x = torch.linspace(-1, 2, 3 * 28 * 28).reshape(3, 1, 28, 28)
    for runtime_here in (None, runtime, RuntimeConfig()):  # the plain model, the run's own fast paths, today's
        model, _ = load_run(OLD_RUN, runtime=runtime_here)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def test_a_record_written_today_reads_back_as_the_same_three_configs(tmp_path):
    model, recipe, runtime = resolve_config("fast", {"attention": "explicit", "threads": 2, "epochs": 3})
    record = {"model": vars(model), "train": vars(recipe), "runtime": vars(runtime)}
    assert configs_from_record(json.loads(json.dumps(record))) == (model, recipe, runtime)
    # keys a newer version may add are ignored
    record["runtime"]["some_future_switch"] = True
    assert configs_from_record(record)[2] == runtime


def test_load_run_gives_the_plain_model_unless_a_runtime_is_named(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    plain, _ = load_run(run)
    fast, _ = load_run(run, runtime=RuntimeConfig())
    assert type(plain).__name__ == "ViT" and isinstance(fast, ClassTokenLastBlockViT)


@pytest.mark.parametrize("section,field,value", [("runtime", "attention", "flash"), ("runtime", "compile", "yes"),
                                                 ("train", "optimizer", "sgd")])
def test_each_config_checks_its_own_choices(section, field, value):
    from vitscope.errors import VitscopeError

    with pytest.raises(VitscopeError, match=f"{field} must be one of"):
        resolve_config("seed", {field: value})


def test_scope_preset_is_a_plain_vit_on_the_7x7_grid_with_small_position_embeddings():
    # what lets its position embeddings learn rows and columns (docs/performance.md#scope-preset)
    model, recipe, _ = resolve_config("scope", {})
    assert model.architecture == "vit" and model.num_patches == 49
    assert model.pos_embed_std == 0.02 and model.depth == 6
    assert recipe.epochs == 7 and recipe.lr == 1e-2
