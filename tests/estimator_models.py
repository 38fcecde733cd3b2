"""Small models of several transformer families, for the estimator's tests (nothing is downloaded).

Odd widths make DeepSpeed pad partitions on two ranks; every family has its own layout quirks (tied or untied
embeddings, biases, learned positions, grouped-query attention, parallel attention/MLP).
"""

from __future__ import annotations

from typing import Any

FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "n_embd": 63, "n_layer": 2, "n_head": 3, "vocab_size": 301, "n_positions": 256},
    "llama": {
        "model_type": "llama",
        "hidden_size": 66,
        "intermediate_size": 173,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "num_key_value_heads": 1,
        "vocab_size": 301,
    },
    "opt": {
        "model_type": "opt",
        "hidden_size": 63,
        "ffn_dim": 131,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "vocab_size": 301,
        "word_embed_proj_dim": 63,
        "max_position_embeddings": 256,
    },
    "gpt_neox": {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "intermediate_size": 171,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 301,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 66,
        "intermediate_size": 173,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "num_key_value_heads": 1,
        "vocab_size": 301,
    },
}


def transformers_config(family: str, **overrides: Any):
    from transformers import AutoConfig

    fields = {**FAMILIES[family], **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
