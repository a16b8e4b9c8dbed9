"""The package as a user installs and imports it: the wheel holds every file the code reads besides its modules,
a regular (not editable) install of it predicts and builds its CPU kernels, and importing it changes nothing in
the importing program."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from test_prediction import drawn

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "vitscope"
# vitscope's dependencies (pyproject.toml), by import name: the test's environment lends them to the new one.
DEPENDENCIES = ("torch", "numpy", "safetensors", "matplotlib", "PIL", "tqdm")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """vitscope's wheel, built offline from a copy of the tree (a build writes build/ and *.egg-info beside
    its sources)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "--no-cache-dir", "--wheel-dir", work / "dist", source],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    [built] = (work / "dist").glob("vitscope-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict]:
    """A new virtual environment with the wheel installed in it (no editable install, no source tree on the
    path), and the environment variables to run it with (a private vitscope cache)."""
    work = tmp_path_factory.mktemp("installed")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    # This environment's pip installs into the new one; it sees nothing there, so neither this environment's
    # vitscope (editable) nor anything else can satisfy or be uninstalled in place of the wheel.
    p = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                        "--no-cache-dir", wheel], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    # Then torch and the rest come from where this interpreter found them, through a .pth file: its lines only
    # extend sys.path, after the new environment's own site-packages, and the .pth files in those folders
    # (this environment's editable vitscope) are not read.
    folders = {str(Path(importlib.util.find_spec(name).origin).parents[1]) for name in DEPENDENCIES}
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (Path(site_packages) / "dependencies-of-the-test-environment.pth").write_text("\n".join(sorted(folders)) + "\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTHON")}
    env.update(VITSCOPE_CACHE=str(work / "cache"), OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    return venv, env


def run_installed(installed, *args, cwd):
    venv, env = installed
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)


def test_the_wheel_holds_every_kernel_source_bundled_model_and_web_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("kernels", "bundled", "web"):
        files = [f for f in (PACKAGE / folder).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        assert files, folder
        for file in files:
            assert f"vitscope/{file.relative_to(PACKAGE).as_posix()}" in names


def test_the_installed_package_is_imported_from_the_new_environment(installed, tmp_path):
    venv, _ = installed
    p = run_installed(installed, "python", "-c", "import vitscope; print(vitscope.__file__)", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    imported = Path(p.stdout.strip()).resolve()
    assert imported.is_relative_to(venv.resolve()), imported
    assert not imported.is_relative_to(ROOT.resolve())


def test_the_installed_command_predicts_with_the_bundled_model(installed, tmp_path):
    drawn(7).save(tmp_path / "seven.png")
    drawn(0).save(tmp_path / "zero.jpg")
    p = run_installed(installed, "vitscope", "predict", "seven.png", "zero.jpg", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert [result["label"] for result in json.loads(p.stdout)] == [7, 0]


def test_the_installed_package_builds_its_kernels_into_the_vitscope_cache(installed, tmp_path):
    script = ("import json; from vitscope import cpu_kernels as k; "
              "print(json.dumps([k.compiler() is not None and k.torch_uses_libgomp(), k.available(), "
              "k.unavailable_reason(), str(k.library_path(k.compiler())) if k.compiler() else '']))")
    p = run_installed(installed, "python", "-c", script, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    buildable, available, reason, library = json.loads(p.stdout)
    if not buildable:
        pytest.skip(f"the kernels cannot be built here: {reason}")
    assert available, reason  # a missing header (kernels/numerics.h) fails the build
    assert Path(library).is_file() and Path(library).parent == Path(installed[1]["VITSCOPE_CACHE"]) / "kernels"


IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, warnings
import matplotlib, numpy, PIL.Image, torch  # the dependencies' own import-time effects are theirs


def settings():
    return [PIL.Image.MAX_IMAGE_PIXELS, [repr(f) for f in warnings.filters], matplotlib.get_backend()]


before = settings()
import vitscope
for module in pkgutil.walk_packages(vitscope.__path__, "vitscope."):
    if module.name != "vitscope.__main__":  # runs the command line
        importlib.import_module(module.name)
print(json.dumps([before, settings()]))
"""


def test_importing_vitscope_leaves_the_programs_pillow_warnings_and_matplotlib_settings_alone(tmp_path):
    # A clean interpreter; MPLBACKEND stands for a program's chosen backend (a notebook's, say).
    env = {**os.environ, "MPLBACKEND": "svg", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    before, after = json.loads(p.stdout)
    assert after == before
