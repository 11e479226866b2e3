"""Loading an export back with plain libraries: plain_load.py, run in one fresh interpreter (`python -I`, so neither
lora_sft nor this folder is on its path), loads each exported folder the way a user would (plain transformers /
peft) and saves its logits on the fidelity samples and what it generated or predicted."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from lora_sft import tokens
from lora_sft.export.fidelity import FidelityError, Outputs, positions
from lora_sft.export.reopen import FinishedRun

PLAIN_NEW_TOKENS = 8  # tokens each plain load generates from each prompt
PLAIN_PROMPTS = 2  # the first samples of the batch, whose prompts the plain loads generate from


def load_plain(
    run: FinishedRun,
    batch: dict,
    loads: dict[str, tuple[str, str | None]],
    dtype: str,
    quantized: tuple[str, ...] = (),
) -> dict[str, tuple[Outputs, dict]]:
    """Run plain_load.py in one fresh interpreter on exported folders, {name: (model, adapter or None)};
    per name, the logits and what it generated or predicted. The loads named in `quantized` load their base with
    the BitsAndBytesConfig the run trained with (`model.quantization_config`), as the card's 4-bit snippet does."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "job.json").write_text(json.dumps(_job(run, batch, loads, dtype, quantized, tmp)))
        script = Path(__file__).with_name("plain_load.py")
        proc = subprocess.run(
            [sys.executable, "-I", str(script), str(tmp / "job.json")], capture_output=True, text=True
        )
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            raise FidelityError(f"an export does not load with plain transformers/peft ({', '.join(loads)}): {last}")
        return {name: _result(run, batch, tmp / name) for name in loads}


def _job(
    run: FinishedRun,
    batch: dict,
    loads: dict[str, tuple[str, str | None]],
    dtype: str,
    quantized: tuple[str, ...],
    tmp: Path,
) -> dict:
    """plain_load.py's JOB.json (its docstring says what each key means); the inputs saved beside it in `tmp`."""
    from safetensors.torch import save_file

    from lora_sft.model.load import quantization_config

    save_file({k: batch[k].contiguous() for k in ("input_ids", "attention_mask")}, str(tmp / "inputs.safetensors"))
    labels = run.checked.labels
    head = tokens.label_config(labels) if labels else {}
    return {
        "kind": run.recipe.task,
        "dtype": dtype,
        "inputs": str(tmp / "inputs.safetensors"),
        "prompts": _prompts(run, batch),
        "max_new_tokens": PLAIN_NEW_TOKENS,
        # a plain base must be told its new head's labels; a merged folder's config has them
        "loads": [
            {
                "model": m,
                "adapter": a,
                "resize_to": run.plan.vocab_rows if a else None,
                "config_overrides": head if a else {},
                "quantization": quantization_config(run.recipe.quant, run.plan.heads, run.settings.dtype).to_dict()  # type: ignore[union-attr]
                if name in quantized
                else None,
                # bitsandbytes' CPU path dequantizes every layer for every generated token: its logits suffice
                "generate": name not in quantized,
                "out": str(tmp / name),
            }
            for name, (m, a) in loads.items()
        ],
    }


def _prompts(run: FinishedRun, batch: dict) -> list[list[int]]:
    """A causal LM's prompts to generate from: the first PLAIN_PROMPTS samples up to their first trained token."""
    prompts = []
    if run.recipe.task == "causal_lm":
        for ids, targets, mask in zip(
            batch["input_ids"][:PLAIN_PROMPTS].tolist(),
            batch["labels"][:PLAIN_PROMPTS].tolist(),
            batch["attention_mask"][:PLAIN_PROMPTS].tolist(),
        ):
            # the prompt: up to the first trained token (label 0 is never a target), or the first half of
            # the sample when every token is trained (text rows, train_on_inputs); never empty
            first = tokens.first_target(targets)
            prompts.append(ids[:first] if first > 1 else ids[: max(1, sum(mask) // 2)])
    return prompts


def _result(run: FinishedRun, batch: dict, out: Path) -> tuple[Outputs, dict]:
    """One load's logits (at the scored positions) and result.json, its generations decoded."""
    from safetensors.torch import load_file

    result = json.loads((out / "result.json").read_text())
    if result["lora_sft_imported"]:
        raise FidelityError("the plain load check imported lora_sft; it must run with plain transformers/peft only")
    if "generated" in result:
        result["generated_text"] = [run.tokenizer.decode(g, skip_special_tokens=False) for g in result.pop("generated")]
    logits = load_file(str(out / "logits.safetensors"))["logits"]
    return positions(run, batch, logits, flat=True), result
