"""`fuyou.params.prefetch_layers` becomes stage 3's gather/prefetch/reduce window, measured in the model's layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from deepspeed_fuyou.plan.preflight import load_fuyou_config
from deepspeed_fuyou.plan.sizing import explicit_window_settings, layer_numel, prefetch_window, stage3_overrides

MODEL_DIR = Path(__file__).resolve().parents[1] / "configs" / "models" / "llama-tiny"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR))


def test_a_layer_is_the_largest_decoder_block_or_leaf(model: torch.nn.Module) -> None:
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    embedding = model.model.embed_tokens.weight.numel()
    assert layer_numel(model) == max(block, embedding)


def test_partitioned_parameters_count_with_their_full_size() -> None:
    linear = torch.nn.Linear(8, 8, bias=False)
    linear.weight.data = torch.empty(0)  # what stage 3 leaves in a partitioned parameter
    linear.weight.ds_numel = 64
    assert layer_numel(linear) == 64


def test_window_reaches_prefetch_layers_ahead_and_reduces_one_layer_at_a_time(model: torch.nn.Module) -> None:
    layer = layer_numel(model)
    assert prefetch_window(model, 3) == {
        "prefetch_bucket_size": 3 * layer,
        "max_live_parameters": 4 * layer,
        "max_reuse_distance": layer,
        "reduce_bucket_size": layer,
    }


def test_deepspeed_knobs_the_user_set_are_kept() -> None:
    zero = {"stage": 3, "stage3_max_live_parameters": 10, "prefetch_bucket_size": 5, "reduce_bucket_size": 7}
    assert explicit_window_settings({"zero_optimization": zero}) == {
        "max_live_parameters",
        "prefetch_bucket_size",
        "reduce_bucket_size",
    }
    assert explicit_window_settings({}) == set()


@pytest.mark.parametrize("prefetch_layers", [0, 2])
def test_params_prefetch_layers_reaches_deepspeed_as_its_window(
    model: torch.nn.Module, prefetch_layers: int, tmp_path: Path
) -> None:
    """From the JSON to stage 3's arguments: `0` prefetches nothing and keeps only the layer computing gathered."""
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}},
        "fuyou": {"params": {"prefetch_layers": prefetch_layers}, "estimator": {"validate": False}},
    }
    config = load_fuyou_config(ds_config)
    layer = layer_numel(model)
    overrides = stage3_overrides(model, config, ds_config, sub_group_size=10**9)
    assert overrides["prefetch_bucket_size"] == prefetch_layers * layer
    assert overrides["max_live_parameters"] == (prefetch_layers + 1) * layer
    ds_config["zero_optimization"]["stage3_prefetch_bucket_size"] = 12345  # the user's own setting wins
    assert "prefetch_bucket_size" not in stage3_overrides(model, config, ds_config, sub_group_size=10**9)
