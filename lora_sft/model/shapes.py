"""A model's shape as the memory planner reads it: from its config, or from lora_sft's table of known models
(known_models.json) when the config cannot be read (validate without the hub)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    pass


TABLE_NOTE = "shape from lora_sft's table of known models"


@dataclass(frozen=True)
class ModelShape:
    """The config.json fields the planner needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    source: str = "config.json"  # or TABLE_NOTE

    @classmethod
    def from_config(cls, config: Any, source: str = "config.json") -> ModelShape:
        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(
            hidden=hidden,
            intermediate=int(get("intermediate_size") or 4 * hidden),
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            vocab=int(get("vocab_size")),
            tied=bool(get("tie_word_embeddings", True)),
            source=source,
        )

    def llama_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of a Llama-shaped decoder (the layout the table's models share)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = {
            "self_attn.q_proj": (h, q),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h),
            "mlp.gate_proj": (h, i),
            "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }
        return {f"model.layers.{n}.{k}": v for n in range(self.layers) for k, v in per_layer.items()}


def _known_table() -> dict:
    """lora_sft/known_models.json: model name -> its config fields and the other ids it goes by."""
    return json.loads(resources.files("lora_sft.model").joinpath("known_models.json").read_text())["models"]


def known_shape(model_path: str) -> ModelShape | None:
    """The shape of a hub model from lora_sft's table of known models (package data), or None."""
    table = _known_table()
    wanted = model_path.lower()
    for name, entry in table.items():
        if wanted in (n.lower() for n in [name, *entry["also"]]):
            return ModelShape.from_config(entry, TABLE_NOTE)
    return None


def known_models() -> dict[str, ModelShape]:
    table = _known_table()
    return {name: ModelShape.from_config(entry, TABLE_NOTE) for name, entry in table.items()}


def file_dtype_bytes(config: Any) -> int:
    """Bytes per weight of the base's weight files, from the config's dtype (fp32 when it names none: what
    save_pretrained writes without one)."""
    dtype = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    if config is not None and not isinstance(config, dict):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
