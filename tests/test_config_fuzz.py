"""Hundreds of random mutations of a good config: each is accepted or refused with a FuyouConfigError, never another
exception type and never a hang (issue 16: configs that validated, then crashed or hung the launch)."""

from __future__ import annotations

import copy
import json
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.plan.preflight import load_fuyou_config

ROOT = Path(__file__).resolve().parent.parent
MUTATIONS = 400
SECONDS_PER_CONFIG = 10

ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    7,
    2**31,
    2**63,
    -(2**63),
    1.5,
    float("nan"),
    float("inf"),
    "",
    "auto",
    "1TiB",
    "-4KiB",
    "1.5MiB",
    "64MiB",
    "0B",
    "yes",
    "\x00",
    "a" * 300,
    [],
    [None],
    ["/nonexistent"],
    {},
    {"unknown": 1},
]


def paths(config: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path and list index inside `config`."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            found.append((*prefix, key))
            found += paths(value, (*prefix, key))
    elif isinstance(config, list):
        for index, value in enumerate(config):
            found.append((*prefix, index))
            found += paths(value, (*prefix, index))
    return found


def mutate(config: dict[str, Any], rng: random.Random, swap: Path) -> dict[str, Any]:
    """One to three random edits: a value replaced by an odd one, a key removed, an unknown key added."""
    config = copy.deepcopy(config)
    odd = [*ODD_VALUES, str(swap), str(swap / "file"), str(swap / "loop")]
    for _ in range(rng.randint(1, 3)):
        *parent_path, last = rng.choice(paths(config))
        parent = config
        for step in parent_path:
            parent = parent[step]
        action = rng.random()
        if action < 0.75:
            parent[last] = copy.deepcopy(rng.choice(odd))
        elif action < 0.9 and isinstance(parent, dict):
            del parent[last]
        elif isinstance(parent, dict):
            parent[f"{last}_extra"] = copy.deepcopy(rng.choice(odd))
    return config


def _timeout(*_: Any) -> None:
    raise TimeoutError(f"validation took more than {SECONDS_PER_CONFIG} s")


@pytest.fixture
def good_config(tmp_path: Path) -> dict[str, Any]:
    swap = tmp_path / "swap"
    swap.mkdir()
    (swap / "file").write_text("not a directory")
    (swap / "loop").symlink_to(swap / "loop")
    config = json.loads((ROOT / "configs" / "fuyou_cpu.json").read_text())
    for offload in ("offload_param", "offload_optimizer"):
        config["zero_optimization"][offload]["nvme_path"] = str(swap)
    config["fuyou"]["nvme_paths"] = [str(swap)]
    config["fuyou"]["activations"] = {"offload": "auto", "tier": "nvme", "min_tensor_size": "1MiB"}
    config["fuyou"]["optimizer"] = {"overlap": "auto"}
    config["fuyou"]["estimator"] = {"validate": True, "margin": 0.05}
    return config


def test_every_random_mutation_of_a_good_config_is_valid_or_a_fuyou_config_error(
    good_config: dict[str, Any], tmp_path: Path
) -> None:
    load_fuyou_config(good_config)  # the starting point is valid
    rng = random.Random(16)
    outcomes = {"valid": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, _timeout)
    try:
        for _ in range(MUTATIONS):
            config = mutate(good_config, rng, tmp_path / "swap")
            signal.alarm(SECONDS_PER_CONFIG)
            try:
                load_fuyou_config(config)
                outcomes["valid"] += 1
            except FuyouConfigError:
                outcomes["refused"] += 1
            except Exception as err:  # any other type is the failure this test looks for
                pytest.fail(f"{type(err).__name__}: {err}\nfor the config {json.dumps(config, default=str)}")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["valid"] > 0 and outcomes["refused"] > MUTATIONS // 2, outcomes
