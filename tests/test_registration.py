"""How fuyou gets into DeepSpeed: the installed import hook, the version gate, and the internals it relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import ClassVar

import pytest

from deepspeed_fuyou.errors import FuyouConfigError, FuyouError

PROBE = """
import sys
assert "torch" not in sys.modules, "the start-up hook imported torch"
import deepspeed
from deepspeed.runtime.zero import partition_parameters, stage3
print(partition_parameters.AsyncPartitionedParameterSwapper.__module__, stage3.DeepSpeedZeroOptimizer_Stage3.__module__)
"""


def probe(**env: str) -> list[str]:
    """What an unchanged script (no `import deepspeed_fuyou`) finds in DeepSpeed's two creation sites."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.split()


def test_installed_hook_registers_fuyou_when_an_unchanged_script_imports_deepspeed() -> None:
    assert probe() == ["deepspeed_fuyou.integration.registration", "deepspeed_fuyou.integration.registration"]


def test_fuyou_disable_leaves_deepspeed_stock() -> None:
    assert probe(FUYOU_DISABLE="1") == [
        "deepspeed.runtime.swap_tensor.partitioned_param_swapper",
        "deepspeed.runtime.zero.stage3",
    ]


IMPORT_WITHOUT_HOOK = """
from deepspeed.runtime.zero import stage3
import deepspeed_fuyou.integration as integration
print(integration.is_registered(), stage3.DeepSpeedZeroOptimizer_Stage3.__module__)
integration.register()
print(integration.is_registered(), stage3.DeepSpeedZeroOptimizer_Stage3.__module__)
"""


def test_importing_the_integration_patches_nothing_and_register_does() -> None:
    """With the hook off, importing the package and DeepSpeed leaves DeepSpeed stock; only `register()` patches."""
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_WITHOUT_HOOK],
        env={**os.environ, "FUYOU_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines()[-2:] == [
        "False deepspeed.runtime.zero.stage3",
        "True deepspeed_fuyou.integration.registration",
    ]


def test_deepspeed_internals_fuyou_relies_on_are_all_present() -> None:
    from deepspeed_fuyou import integration

    integration.check_deepspeed_internals()


def test_internals_check_fails_loudly_when_deepspeed_drops_a_method(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepspeed_fuyou import integration

    monkeypatch.delattr(integration.STOCK_STAGE3, "reset_swap_buffers")
    with pytest.raises(FuyouError, match="reset_swap_buffers"):
        integration.check_deepspeed_internals()


@pytest.mark.parametrize("version", ["0.18.9", "0.20.0", "1.0.0"])
def test_unsupported_deepspeed_version_is_refused_with_the_range(version: str) -> None:
    from deepspeed_fuyou import integration

    with pytest.raises(FuyouError, match=r"0\.19\.8 <= version < 0\.20.*FUYOU_DISABLE=1"):
        integration.check_deepspeed_version(version)


def test_unregister_restores_deepspeed_classes_and_register_is_idempotent() -> None:
    from deepspeed.runtime.zero import partition_parameters, stage3

    from deepspeed_fuyou import integration

    integration.unregister()
    try:
        assert stage3.DeepSpeedZeroOptimizer_Stage3 is integration.STOCK_STAGE3
        assert partition_parameters.AsyncPartitionedParameterSwapper is integration.STOCK_PARAM_SWAPPER
        assert not integration.is_registered()
    finally:
        integration.register()
        integration.register()
    assert integration.is_registered()
    assert stage3.DeepSpeedZeroOptimizer_Stage3 is integration.zero3_optimizer


@pytest.mark.parametrize(
    "module", ["deepspeed_fuyou.integration.zero_optimizer", "deepspeed_fuyou.integration.param_swapper"]
)
def test_importing_a_swapper_first_still_registers_and_subclasses_stock_deepspeed(module: str) -> None:
    """The swappers import DeepSpeed, whose import triggers registration: neither may see the other half-built."""
    code = f"""
import {module}
from deepspeed_fuyou import integration
from deepspeed_fuyou.integration.zero_optimizer import FuyouZeroOptimizer
assert integration.is_registered()
assert FuyouZeroOptimizer.__bases__ == (integration.STOCK_STAGE3,), FuyouZeroOptimizer.__bases__
assert integration.STOCK_STAGE3.__module__ == "deepspeed.runtime.zero.stage3"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_a_null_fuyou_block_is_refused_by_both_factories_instead_of_running_stock() -> None:
    """`"fuyou": null` looks like "no block" to a `.get()`; it is a mistake to report, not a request for stock."""
    import torch

    from deepspeed_fuyou import integration

    class Config:
        _param_dict: ClassVar[dict] = {"fuyou": None}

    with pytest.raises(FuyouConfigError, match="must be a JSON object"):
        integration.parameter_swapper(Config(), torch.float32)
    with pytest.raises(FuyouConfigError, match="must be a JSON object"):
        integration.zero3_optimizer(None, None, None, ds_config={"fuyou": None})


UNSUPPORTED = """
import sys, warnings
from deepspeed_fuyou import _hook
sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _hook._DeepSpeedFinder)]  # the start-up hook's
import deepspeed
deepspeed.__version__ = "0.18.0"  # as if this DeepSpeed were one fuyou does not support
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _hook.install()
print("warned:", any("not active" in str(w.message) for w in caught))
from deepspeed_fuyou.errors import FuyouError
for config in ({"train_batch_size": 1, "fuyou": {}}, sys.argv[1]):
    try:
        deepspeed.initialize(model=None, config=config)
    except FuyouError as err:
        print("refused:", "0.19.8 <= version < 0.20" in str(err))
try:
    deepspeed.initialize(model=None, config={"train_batch_size": 1})
except FuyouError:
    print("a config without the block was refused too")
except Exception as err:
    print("stock:", type(err).__name__)
"""


def test_a_fuyou_block_is_refused_at_initialize_when_fuyou_cannot_register(tmp_path) -> None:
    """On a DeepSpeed that fuyou does not support, a config with the block (as a dict or a JSON file) fails at
    `deepspeed.initialize` naming why, instead of training stock DeepSpeed with the block ignored; a config without
    it still goes to stock DeepSpeed (here failing on the missing model, which is stock's own error)."""
    config = tmp_path / "ds.json"
    config.write_text('{"train_batch_size": 1, "fuyou": {"nvme_paths": ["/tmp"]}}')
    result = subprocess.run(
        [sys.executable, "-c", UNSUPPORTED, str(config)],
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split("\n")[:-1] == ["warned: True", "refused: True", "refused: True", "stock: AssertionError"]


CACHE_PROBE = "import os; print(os.environ.get('TORCH_EXTENSIONS_DIR'))"


def test_deepspeeds_op_cache_is_this_environments_own_unless_the_user_set_one() -> None:
    """Ops built by scripts/install.sh are found by every run of the same environment, and another checkout's
    environment never rebuilds them over (torch's shared default cache is keyed by op name only)."""
    environment = {key: value for key, value in os.environ.items() if key != "TORCH_EXTENSIONS_DIR"}
    found = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=environment, capture_output=True, text=True)
    assert found.stdout.strip() == os.path.join(sys.prefix, "torch_extensions")
    chosen = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE],
        env={**environment, "TORCH_EXTENSIONS_DIR": "/elsewhere"},
        capture_output=True,
        text=True,
    )
    assert chosen.stdout.strip() == "/elsewhere"
    off = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE], env={**environment, "FUYOU_DISABLE": "1"}, capture_output=True, text=True
    )
    assert off.stdout.strip() == "None"


def test_cpu_accelerator_reads_the_numa_layout_once_when_the_launcher_did_not_say(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from deepspeed.utils import numa

    from deepspeed_fuyou.integration.registration import read_numa_layout_once

    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setattr(numa, "get_numa_cores", numa.get_numa_cores)  # restored after the test
    calls = []
    real = subprocess.check_output
    monkeypatch.setattr(subprocess, "check_output", lambda *a, **k: calls.append(a) or real(*a, **k))
    accelerator = CPU_Accelerator()
    counts = {accelerator.device_count() for _ in range(3)}
    assert len(calls) == 3  # stock: a `numactl` subprocess per call
    read_numa_layout_once()
    read_numa_layout_once()
    counts |= {accelerator.device_count() for _ in range(3)}
    assert len(calls) == 4 and len(counts) == 1  # then one, with the same answer
