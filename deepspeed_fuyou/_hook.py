"""Registration of fuyou into DeepSpeed for unchanged training scripts.

`import deepspeed_fuyou` runs `install()`, and so does every interpreter of the environment at start-up through
`deepspeed_fuyou-hook.pth`, which the package installs into site-packages. It must therefore cost nothing: it
imports neither torch nor DeepSpeed. If DeepSpeed is already imported it registers at once, otherwise it waits for
`import deepspeed` and then calls `deepspeed_fuyou.integration.register()`. `FUYOU_DISABLE=1` turns it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from types import ModuleType


class _RegisterAfterImport(importlib.abc.Loader):
    """Runs DeepSpeed's own loader, then registers fuyou; the module keeps its original loader."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register()


class _DeepSpeedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "deepspeed":
            return None
        sys.meta_path.remove(self)  # one shot, and lets the lookup below find the real package
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterImport(spec.loader)
        return spec


def _register() -> None:
    """Registers, or warns (without breaking stock DeepSpeed) when this DeepSpeed is one fuyou does not support."""
    from deepspeed_fuyou.errors import FuyouError

    importing = sys.modules.get("deepspeed_fuyou.integration")
    if importing is not None and not hasattr(importing, "register"):
        return  # `import deepspeed_fuyou.integration` imported deepspeed; it registers when its import completes
    try:
        from deepspeed_fuyou import integration

        integration.register()
    except FuyouError as err:
        warnings.warn(f"deepspeed-fuyou is not active: {err}", stacklevel=3)


def install() -> None:
    if os.environ.get("FUYOU_DISABLE") == "1":
        return
    if "deepspeed" in sys.modules:
        _register()
    elif not any(isinstance(finder, _DeepSpeedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _DeepSpeedFinder())
