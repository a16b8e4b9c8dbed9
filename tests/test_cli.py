"""What a user types: every user error is exit 2 with one line on stderr and no traceback."""
import json
import subprocess
import sys

import pytest

from conftest import run_cli
from vitscope import __version__


def assert_user_error(p, *words):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_version_and_help():
    p = run_cli("--version")
    assert p.returncode == 0 and __version__ in p.stdout
    for command in ("train", "eval", "data", "analyze", "predict", "export", "serve"):
        assert run_cli(command, "--help").returncode == 0


def test_unknown_preset_is_named(idx_dir, tmp_path):
    assert_user_error(run_cli("train", "--preset", "no-such-preset", "--dataset", "idx", "--data-dir", idx_dir,
                              "--out", tmp_path / "r"), "no-such-preset")


def test_eval_of_a_missing_run(tmp_path):
    assert_user_error(run_cli("eval", tmp_path / "nope", "--json"), "no run directory")


def test_unreadable_data_dir(tmp_path):
    assert_user_error(run_cli("train", "--dataset", "idx", "--data-dir", tmp_path / "nope", "--out", tmp_path / "r"),
                      "does not exist")


def test_truncated_idx_files(idx_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in idx_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_user_error(run_cli("train", "--dataset", "idx", "--data-dir", bad, "--out", tmp_path / "r"))


def test_mnist_data_dir_failing_the_checksums(idx_dir, tmp_path):
    assert_user_error(run_cli("data", "--data-dir", idx_dir), "SHA-256")


def test_no_network_and_no_cache_is_one_clear_line(tmp_path):
    # No mirror resolves and pip finds no index: both remote sources fail fast, with no traceback.
    env = {"VITSCOPE_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_NO_INDEX": "1", "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "PIP_CONFIG_FILE": "/dev/null"}
    p = run_cli("data", env=env, timeout=300)
    assert_user_error(p, "cannot get MNIST", "--data-dir")


def test_resume_without_a_checkpoint(tmp_path):
    assert_user_error(run_cli("train", "--resume", "--out", tmp_path), "not a vitscope run directory")


def test_bad_flag_value_is_one_line():
    assert_user_error(run_cli("train", "--epochs", "many"), "--epochs")


def test_bad_config_file(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    assert_user_error(run_cli("train", "--config", tmp_path / "c.json"), "not valid")
    (tmp_path / "d.json").write_text(json.dumps({"dim": "wide"}))
    assert_user_error(run_cli("train", "--config", tmp_path / "d.json"), "dim")


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_missing_accelerator_is_a_user_error(idx_dir, tmp_path, device):
    import torch
    has = torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()
    if has:
        pytest.skip(f"this machine has {device}")
    assert_user_error(run_cli("train", "--device", device, "--dataset", "idx", "--data-dir", idx_dir,
                              "--out", tmp_path / "r", "--epochs", "1"), device)


def test_the_command_exits_the_usual_way_under_a_profiler_so_its_report_is_written():
    # `vitscope` skips Python's teardown (os._exit) unless a profiler or tracer waits for the exit.
    p = subprocess.run([sys.executable, "-m", "cProfile", "-m", "vitscope"], capture_output=True,  # prints help
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and "usage: vitscope" in p.stdout
    assert "function calls" in p.stdout, p.stdout[-500:]
