"""Real MNIST (marked slow): fetched once through the real sources into a private cache."""
import json
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    p = run_cli("data", env={"VITSCOPE_CACHE": str(cache)}, timeout=900)
    assert p.returncode == 0, p.stderr
    assert "SHA-256 verified" in p.stdout
    return cache


def test_data_command_says_which_source_served(mnist_cache):
    p = run_cli("data", env={"VITSCOPE_CACHE": str(mnist_cache)})
    assert p.returncode == 0 and "served by: cache" in p.stdout
    assert "60000 train + 10000 test" in p.stdout


def test_a_few_thousand_real_mnist_images_are_learned(mnist_cache, tmp_path):
    env = {"VITSCOPE_CACHE": str(mnist_cache)}
    run = tmp_path / "run"
    # The blog's plain recipe (Adam, constant lr) at lr 1e-3 learns fastest from few steps; the seed preset's
    # shifts, label smoothing and warmup pay off only over its full budget. 10,000 images, 5 epochs: ~15 s.
    recipe = Path(__file__).parents[1] / "configs" / "seed-blog-recipe.toml"
    p = run_cli("train", "--preset", "seed", "--config", recipe, "--lr", "1e-3", "--max-train-samples", "10000",
                "--epochs", "5", "--batch-size", "32", "--out", run, "--no-progress", env=env)
    assert p.returncode == 0, p.stderr
    p = run_cli("eval", run, "--json", env=env)
    result = json.loads(p.stdout)
    assert result["n"] == 10000
    assert result["test_acc"] >= 0.8, result  # chance is 0.10; 0.866 measured
