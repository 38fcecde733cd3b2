"""Builds deepspeed-fuyou and its native core `deepspeed_fuyou._C`.

The CPU part (O_DIRECT I/O engine on Linux AIO, io_uring when liburing is present, pinned buffer pool) is always
built. The CUDA part (host-memory registration for true pinned staging buffers) is compiled in only where a CUDA
toolkit and a CUDA build of torch are both present; `FUYOU_FORCE_CPU=1` skips it.
"""

import os
import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
SOURCES = ["csrc/bindings.cpp", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "fuyou").glob("*.cpp"))]


def header_exists(name: str) -> bool:
    return any((Path(d) / name).exists() for d in ("/usr/include", "/usr/local/include"))


def build_extension() -> cpp_extension.CppExtension:
    macros = []
    libraries = ["aio"]
    if not header_exists("libaio.h"):
        raise RuntimeError("libaio.h not found: install libaio-dev (scripts/install.sh does) and build again")
    if header_exists("liburing.h"):
        macros.append(("FUYOU_WITH_URING", None))
        libraries.append("uring")
    args = {
        "sources": SOURCES,
        "define_macros": macros,
        "libraries": libraries,
        "extra_compile_args": {"cxx": ["-O3", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]},
    }
    import torch

    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FUYOU_FORCE_CPU") != "1"
    )
    if with_cuda:
        macros.append(("FUYOU_WITH_CUDA", None))
        args["extra_compile_args"]["nvcc"] = ["-O3"]
        return cpp_extension.CUDAExtension("deepspeed_fuyou._C", **args)
    return cpp_extension.CppExtension("deepspeed_fuyou._C", **args)


def package_version() -> str:
    """The one place the version is written: `deepspeed_fuyou.__version__` (read as text: the package is not built)."""
    found = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "deepspeed_fuyou" / "__init__.py").read_text(), re.M)
    assert found is not None, "deepspeed_fuyou/__init__.py must set __version__"
    return found.group(1)


HOOK = "deepspeed_fuyou-hook.pth"
"""The import hook (`deepspeed_fuyou._hook`): a `.pth` file at the top of site-packages, which every interpreter of the
environment runs at start-up, so that an unchanged script gets fuyou when it imports deepspeed."""


class BuildPyWithHook(build_py):
    """Puts the hook at the top of the build: a wheel (and `pip install .`, which builds one) installs that into
    site-packages."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(ROOT / HOOK), str(Path(self.build_lib) / HOOK))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / HOOK)]


class EditableWheelWithHook(editable_wheel):
    """An editable install links the packages to the source tree and carries nothing else of the build: its wheel
    gets the hook added by hand. (setuptools offers no public seam for this; tests/test_packaging.py fails if the
    hook stops reaching site-packages.)"""

    def _select_strategy(self, name: str, tag: str, build_lib: str) -> object:
        return _AddHook(super()._select_strategy(name, tag, build_lib))


class _AddHook:
    """An editable strategy that also writes the hook at the top of the wheel."""

    def __init__(self, strategy: object) -> None:
        self.strategy = strategy

    def __call__(self, wheel: object, files: list[str], mapping: dict[str, str]) -> None:
        self.strategy(wheel, files, mapping)
        wheel.writestr(HOOK, (ROOT / HOOK).read_bytes())

    def __enter__(self) -> "_AddHook":
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc: object) -> object:
        return self.strategy.__exit__(*exc)


setup(
    name="deepspeed-fuyou",
    version=package_version(),
    description="Fast, memory-safe ZeRO-Infinity on one GPU, modest DRAM and NVMe SSDs: a DeepSpeed plug-in",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",  # DeepSpeed's own, whose runtime this package plugs into
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Environment :: GPU :: NVIDIA CUDA",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    keywords=["deepspeed", "zero-infinity", "nvme", "offload", "llm", "training"],
    python_requires=">=3.10",
    packages=find_packages(include=["deepspeed_fuyou", "deepspeed_fuyou.*"]),
    ext_modules=[build_extension()],
    cmdclass={
        "build_ext": cpp_extension.BuildExtension,
        "build_py": BuildPyWithHook,
        "editable_wheel": EditableWheelWithHook,
    },
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=4.45",
        "accelerate>=1.1",
        "libaio>=0.9",
        "pydantic>=2.5",
    ],
    extras_require={"plot": ["matplotlib>=3.7"], "test": ["pytest>=8", "ruff>=0.6", "matplotlib>=3.7", "build>=1.0"]},
    entry_points={"console_scripts": ["fuyou = deepspeed_fuyou.cli.main:main"]},
)
