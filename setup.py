"""Builds deepspeed-fuyou and its native core `deepspeed_fuyou._C`.

The CPU part (O_DIRECT I/O engine on Linux AIO, io_uring when liburing is present, pinned buffer pool) is always
built. The CUDA part (host-memory registration for true pinned staging buffers) is compiled in only where a CUDA
toolkit and a CUDA build of torch are both present; `FUYOU_FORCE_CPU=1` skips it.
"""

import os
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup
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


def site_packages_relative() -> str:
    """Where `.pth` files take effect, relative to the install prefix (e.g. lib/python3.11/site-packages).

    Shipped as data, the import hook lands there for regular and editable installs alike.
    """
    return os.path.relpath(sysconfig.get_path("purelib"), sys.prefix)


setup(
    name="deepspeed-fuyou",
    version="0.1.0",
    description="Fast, memory-safe ZeRO-Infinity on one GPU, modest DRAM and NVMe SSDs: a DeepSpeed plug-in",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["deepspeed_fuyou", "deepspeed_fuyou.*"]),
    ext_modules=[build_extension()],
    data_files=[(site_packages_relative(), ["deepspeed_fuyou-hook.pth"])],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=4.45",
        "accelerate>=1.1",
        "libaio>=0.9",
        "pydantic>=2.5",
    ],
    extras_require={"plot": ["matplotlib>=3.7"], "test": ["pytest>=8", "ruff>=0.6", "matplotlib>=3.7"]},
    entry_points={"console_scripts": ["fuyou = deepspeed_fuyou.cli.main:main"]},
)
