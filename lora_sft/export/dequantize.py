"""The weights as trained: a bitsandbytes layer's weight dequantized exactly as its forward computes with it, and an
unquantized model given every weight of the quantized one. `export` merges onto these (--onto dequantized) and
`eval` generates with them on the CPU (evaluation.generator).
"""

from __future__ import annotations

from typing import Any

import torch

from lora_sft import compat
from lora_sft.export.fidelity import FidelityError


def dequantized(layer: torch.nn.Module) -> torch.Tensor | None:
    """A bitsandbytes layer's weight as its forward multiplies by it, or None for any other layer. 4-bit: unpacked
    with the layer's quant state (`dequantize_4bit`) and cast to the compute dtype, as Linear4bit.forward does with
    its input (on CPU its kernel is exactly this dequantize, then a plain matmul). int8: the row-wise int8 weight
    times its scale, as close as a weight gets: LLM.int8() also rounds the activations, which no weight can hold."""
    import bitsandbytes as bnb
    from bitsandbytes import functional as bnb_f

    weight: Any = layer.weight  # bitsandbytes' Params4bit / Int8Params: a tensor with its quantization state
    if isinstance(layer, bnb.nn.Linear4bit):
        state = weight.quant_state
        if compat.repacked_for_cpu(state):  # load_base keeps layers out of this layout
            raise FidelityError(
                "a 4-bit layer was repacked for CPU inference (AVX512-BF16) and cannot be dequantized; load the run with lora_sft.model.load.load_base"
            )
        return bnb_f.dequantize_4bit(weight.data, state).to(layer.compute_dtype or state.dtype)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        lt_state: Any = layer.state  # after a forward the scale lives here, not on the weight
        scale = weight.SCB if getattr(weight, "SCB", None) is not None else lt_state.SCB
        return bnb_f.int8_vectorwise_dequant(weight.data, scale)
    return None


def take_trained_weights(unmerged, trained) -> None:
    """Give `unmerged` (the unquantized base + adapter, in the export dtype) every weight of `trained` (the base as
    trained + the same adapter) as trained's forward uses it: quantized layers dequantized (`dequantized`), all
    others (norms, embeddings, heads, the adapter itself) as they are, cast to the export dtype."""
    source = dict(trained.named_parameters())
    target = dict(unmerged.named_parameters())
    if set(source) != set(target):
        odd = sorted(set(source) ^ set(target))
        raise FidelityError(
            f"the trained and the unquantized model differ in their weights ({', '.join(odd[:3])}); cannot merge onto the trained weights"
        )
    owners = dict(trained.named_modules())
    with torch.no_grad():
        for name, weight in source.items():
            owner, _, local = name.rpartition(".")
            value = dequantized(owners[owner]) if local == "weight" else None
            target[name].copy_(weight if value is None else value)
