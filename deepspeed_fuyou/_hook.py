"""Registration of fuyou into DeepSpeed for unchanged training scripts.

`import deepspeed_fuyou` runs `install()`, and so does every interpreter of the environment at start-up through
`deepspeed_fuyou-hook.pth`, which the package installs into site-packages. It must therefore cost nothing: it
imports neither torch nor DeepSpeed. If DeepSpeed is already imported it registers at once, otherwise it waits for
`import deepspeed` and then calls `deepspeed_fuyou.integration.register()`. `FUYOU_DISABLE=1` turns it off. Where
registration fails (a DeepSpeed version fuyou does not support), a config with a `"fuyou"` block is refused rather
than trained with stock DeepSpeed, silently ignoring the block. In a virtual environment it also gives torch's JIT
extension cache (DeepSpeed's ops) a home of its own, unless `TORCH_EXTENSIONS_DIR` is set.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
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
    """Registers; where this DeepSpeed is one fuyou does not support, warns and leaves stock DeepSpeed working for
    configs without a `"fuyou"` block, while one with the block fails at `deepspeed.initialize` (`_refuse_blocks`)
    instead of training stock silently."""
    from deepspeed_fuyou.errors import FuyouError

    try:
        # The module, not the package: when `import deepspeed_fuyou.integration` is what imports DeepSpeed, the
        # package is still at its first line here (see its `import deepspeed`).
        from deepspeed_fuyou.integration.registration import register

        register()
    except FuyouError as err:
        warnings.warn(f"deepspeed-fuyou is not active: {err}", stacklevel=3)
        _refuse_blocks(str(err))


def _refuse_blocks(reason: str) -> None:
    """Wraps `deepspeed.initialize` (the public entry every launcher and trainer goes through) so that a config with
    a `"fuyou"` block raises FuyouError with `reason` instead of running stock DeepSpeed."""
    import deepspeed

    from deepspeed_fuyou.errors import FuyouError

    stock = deepspeed.initialize

    @functools.wraps(stock)
    def initialize(*args: object, **kwargs: object) -> object:
        given_args = kwargs.get("args", args[0] if args else None)
        if _has_fuyou_block(kwargs.get("config", kwargs.get("config_params")), given_args):
            raise FuyouError(
                f'this DeepSpeed config has a "fuyou" block, but fuyou is not active: {reason}. Remove the block to '
                "train with stock DeepSpeed"
            )
        return stock(*args, **kwargs)

    deepspeed.initialize = initialize


def _has_fuyou_block(config: object, args: object) -> bool:
    """Whether the config `deepspeed.initialize` was given (a dict, a JSON file, or `args.deepspeed_config`) has the
    block; a config that cannot be read is left to DeepSpeed to report."""
    config = config if config is not None else getattr(args, "deepspeed_config", None)
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as file:
                config = json.load(file)
        except (OSError, ValueError):
            return False
    from deepspeed_fuyou.config.fuyou import BLOCK

    return isinstance(config, dict) and BLOCK in config


def install() -> None:
    if os.environ.get("FUYOU_DISABLE") == "1":
        return
    _extension_cache_per_environment()
    if "deepspeed" in sys.modules:
        _register()
    elif not any(isinstance(finder, _DeepSpeedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _DeepSpeedFinder())


def _extension_cache_per_environment() -> None:
    """Points torch's JIT extension cache (where DeepSpeed builds its ops) into this virtual environment, unless the
    user chose one (`TORCH_EXTENSIONS_DIR`). The shared default (~/.cache/torch_extensions) is keyed by op name
    only: two environments at different paths (two checkouts) build the same op from different sources, each
    rebuild invalidating the other's, and the ops `scripts/install.sh` builds ahead of the first run are found only
    by runs of the environment they were built for. A prefix we cannot write (a system Python) keeps the default."""
    if "TORCH_EXTENSIONS_DIR" in os.environ or sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
