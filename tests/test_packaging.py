"""The package as users get it: `python -m build` makes an sdist and a wheel, and every install mode puts the import
hook into site-packages, so that an unchanged script launched with `deepspeed` uses fuyou."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import deepspeed_fuyou

pytestmark = pytest.mark.launches  # every test here starts processes (run_tests.sh --fast leaves them out)

ROOT = Path(__file__).resolve().parents[1]
HOOK = "deepspeed_fuyou-hook.pth"

PROBE = """
import deepspeed, deepspeed_fuyou
from deepspeed.runtime.zero import partition_parameters, stage3
print(deepspeed_fuyou.__file__)
print(partition_parameters.AsyncPartitionedParameterSwapper.__module__, stage3.DeepSpeedZeroOptimizer_Stage3.__module__)
"""


def run(*command: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


def source_tree(target: Path) -> Path:
    """The repository's files (tracked, and new ones git does not ignore), as a clean checkout would have them."""
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=ROOT).split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


def fresh_venv(path: Path) -> Path:
    """A new environment whose only packages are this one's dependencies, seen through a path entry to the current
    environment's site-packages (whose `.pth` files, our hook among them, Python does not run from there)."""
    run(sys.executable, "-m", "venv", "--without-pip", path, cwd=path.parent)
    python = path / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=path).strip())
    (site / "zz-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def test_python_m_build_makes_an_sdist_and_a_wheel_that_installs_with_its_hook_and_its_command(tmp_path: Path) -> None:
    """The wheel is built from the sdist (what `python -m build` does), so the sdist must carry everything the build
    needs (the native headers among them); installed into a fresh environment, the wheel puts the hook into
    site-packages, `fuyou --version` answers, and a script that only imports deepspeed gets fuyou's classes."""
    source = source_tree(tmp_path / "source")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp_path / "dist", ".", cwd=source)
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with tarfile.open(sdist) as archive:
        names = {Path(name).relative_to(Path(name).parts[0]).as_posix() for name in archive.getnames()}
    assert {"csrc/fuyou/engine.h", "csrc/bindings.cpp", HOOK, "LICENSE", "MANIFEST.in"} <= names
    with zipfile.ZipFile(wheel) as archive:
        assert HOOK in archive.namelist()
        metadata = archive.read(f"deepspeed_fuyou-{deepspeed_fuyou.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata or "License: Apache-2.0" in metadata
    assert "Requires-Dist: deepspeed<0.20,>=0.19.8" in metadata and "Classifier: Operating System :: POSIX" in metadata

    python = fresh_venv(tmp_path / "venv")
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip())
    assert (site / HOOK).read_text() == (ROOT / HOOK).read_text()
    version = run(tmp_path / "venv" / "bin" / "fuyou", "--version", cwd=tmp_path)
    assert version.strip() == f"deepspeed-fuyou {deepspeed_fuyou.__version__}"
    imported, modules = run(python, "-c", PROBE, cwd=tmp_path).strip().split("\n")[-2:]
    assert Path(imported).is_relative_to(site)  # the installed package, not the source tree
    assert modules.split() == ["deepspeed_fuyou.integration.registration", "deepspeed_fuyou.integration.registration"]


def test_the_installed_package_carries_the_hook_in_its_own_record() -> None:
    """However this environment installed the package (the README's install is editable, `pip install -e .`, which
    carries no data files of its own), pip installed the hook as one of the package's files: it is listed in the
    distribution's RECORD and sits in site-packages."""
    distribution = importlib.metadata.distribution("deepspeed-fuyou")
    files = {str(file) for file in distribution.files or []}
    assert HOOK in files
    assert Path(distribution.locate_file(HOOK)).read_text() == (ROOT / HOOK).read_text()
    direct_url = distribution.read_text("direct_url.json")
    if direct_url is not None and json.loads(direct_url).get("dir_info", {}).get("editable"):
        assert Path(deepspeed_fuyou.__file__).is_relative_to(ROOT)  # the editable install points at this checkout
