"""The project installs as one namespace: a built wheel in a fresh virtual environment, beside another package
that provides a top-level `kernels` module (as the model hub's `kernels` package does), imports both correctly,
and the `qwenpd` console script runs from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("protos", "kernels", "engine", "cache_store", "prefill_service", "decode_service", "clients")

CHECK = """
import sys
import kernels
import qwenpd
import qwenpd.kernels
import qwenpd.engine.engine
import qwenpd.clients
from qwenpd.clients import Client
from qwenpd.protos.qwenpd.v1 import decode_pb2
assert kernels.WHO == "the other kernels package", kernels.__file__
assert qwenpd.kernels.__file__.startswith(sys.prefix), (qwenpd.kernels.__file__, sys.prefix)
assert qwenpd.__file__.startswith(sys.prefix), qwenpd.__file__
assert callable(qwenpd.kernels.chunk_gated_delta_rule)
print("ok", kernels.__file__, qwenpd.kernels.__file__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools leaves build/ in the source tree and reuses it, stale modules included.
    src = tmp_path_factory.mktemp("src") / "qwenpd"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                             ".hypothesis", ".pytest_cache", "runs"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("qwenpd-*.whl")
    return built


def test_wheel_holds_only_the_qwenpd_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"qwenpd"}, top
    for folder in FOLDERS:  # every folder (and its subpackages) travels, with its data files
        assert f"qwenpd/{folder}/__init__.py" in names, folder
    assert "qwenpd/kernels/nki/emulator/__init__.py" in names
    assert "qwenpd/protos/qwenpd/v1/decode.proto" in names


def test_fresh_venv_beside_another_kernels_package(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    # System site-packages provide torch, grpc, ... (installing them again would take minutes); the venv's own
    # site-packages come first on the path, so the wheel installed there is the qwenpd that is imported.
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    other = site / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text('WHO = "the other kernels package"\n')
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    run = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert str(other) in run.stdout and str(site / "qwenpd" / "kernels") in run.stdout
    cli = subprocess.run([str(env_dir / "bin" / "qwenpd"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0 and "init-model" in cli.stdout, cli.stderr


FROM_THE_ROOT = """
import sys
assert sys.path[0] == "", sys.path[:2]  # the checkout root is first on the path, as for any `python -` there
import transformers.models.qwen3_5.modeling_qwen3_5  # imports Hugging Face's `kernels` package
import kernels
import qwenpd.kernels
assert not kernels.__file__.startswith(ROOT + "/"), kernels.__file__  # the installed package, not our folder
assert qwenpd.kernels.__file__.startswith((ROOT + "/", sys.prefix + "/"))
assert kernels is not qwenpd.kernels
for name in FOLDERS:
    try:
        __import__(name)
    except ImportError as e:  # nothing installed under that name: the folder says where it belongs
        assert f"qwenpd.{name}" in str(e), e
    else:
        assert not sys.modules[name].__file__.startswith(ROOT + "/" + name), (name, sys.modules[name].__file__)
print("ok")
"""


def test_running_from_the_checkout_root_shadows_no_installed_package() -> None:
    """A command run from the repository root (pytest, `python -`, a script there) has the root on sys.path; no
    top-level folder of ours may then stand in for an installed package of the same name (transformers imports
    Hugging Face's `kernels`), and importing a folder by its bare name never gives our code."""
    pytest.importorskip("transformers")
    source = f"ROOT = {str(REPO)!r}\nFOLDERS = {(*FOLDERS, 'gateway')!r}\n" + FROM_THE_ROOT
    run = subprocess.run([sys.executable, "-"], input=source, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
