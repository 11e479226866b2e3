"""Export a finished run: the adapter (PEFT format), optionally the merged model, and proof they equal what was trained.

    RUN_DIR/export/            (or --out DIR)
      adapter/                 adapter_model.safetensors, adapter_config.json, tokenizer + chat template, README.md card
      merged/                  (--merged) the base in --dtype with the adapter merged in (--onto below): sharded
                               safetensors, config, generation config, tokenizer, README.md card
      gguf/                    (--gguf, implies --merged) <name>-<type>.gguf and an Ollama Modelfile (gguf_export.py)
      fidelity.json            the comparisons below, the load checks, serving warnings, peak memory

--onto dequantized (the default) merges the adapter onto the 4-bit weights dequantized exactly as bitsandbytes
did in training, so the merged model is the model that was trained and evaluated; --onto original merges it
onto the base's unquantized weights, which the 4-bit ones only approximate.

The fidelity report runs the same held-out samples through (a) the 4-bit base + adapter as trained,
(b) the unquantized base in --dtype + the adapter, unmerged, (d) the dequantized base in --dtype + the adapter,
unmerged, and (c) the merged model as saved, loaded back from disk in a fresh interpreter with plain
transformers. For each pair: max |logit difference|, mean KL divergence, perplexity change and greedy
next-token agreement. What was merged, (b) or (d), vs (c) must agree within a tolerance or the export fails
(exit 1) and nothing is written; (a) vs (b) is the quantization gap and (a) vs (c) the export's distance
to the model as trained, reported as they are. `merge_onto` compares both merges with (a): distance,
agreement and loss. The adapter export is loaded the same way (plain peft on the unquantized base) and
must reproduce (b).

An export never removes or overwrites anything of the run it reads: `--out` may not be the run, hold it,
or sit inside one of its files; an existing folder is replaced only if it is an earlier export (marked
with `.lora_sft-export`). Everything is written into a staging folder beside `--out` and renamed into
place at the end, so a failure (exit 1 for a failed check) leaves the earlier export as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lora_sft import tokens
from lora_sft.errors import RunError, UserError
from lora_sft.run.rundir import (
    ADAPTER_CONFIG,
    ARTIFACTS,
    EXPORT,
    ExportDir,
    FidelityReport,
    FinishedRun,
    check_writable,
    entries,
    open_run,
)

# (atol, rtol) on max |logit difference| for merged vs unmerged, by export dtype: rounding the merged
# weight to the dtype is the only legitimate difference, and it grows as the dtype narrows.
ExportDtype = Literal["bf16", "fp16", "fp32"]
# What `export --merged` merges the adapter onto: the 4-bit weights dequantized (the model as trained), or the
# base's original weights (what the 4-bit weights approximate).
MergeOnto = Literal["dequantized", "original"]
ONTO: tuple[MergeOnto, ...] = ("dequantized", "original")
TOLERANCE = {"fp32": (1e-4, 1e-5), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 5e-2)}
# A merge in a 16-bit dtype rounds every merged weight once more; the rounding of the trained model to the same dtype
# (max |d - a|, measured on the same samples) is the scale of that, so the tolerance adds twice it to the floor above.
ROUNDING_MARGIN = 2
# The fidelity verdict is taken on at least this many scored positions (causal LMs): eval rows first, then train rows
# when the eval split is too small, at most MAX_SAMPLES rows.
MIN_POSITIONS = 512
MAX_SAMPLES = 64
FORWARD_ROWS = 4  # rows per forward pass: a 49k vocabulary x 256 positions x 4 bytes is 50 MB of logits per row
# Ranks vLLM's --max-lora-rank accepts (its default is 16).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Linear layers of decoder blocks that vLLM's LoRA layers cover across the common architectures.
VLLM_TARGETS = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "c_attn",
    "c_proj",
    "c_fc",
    "query_key_value",
    "dense",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "fc1",
    "fc2",
    "out_proj",
    "w1",
    "w2",
    "w3",
    "wqkv",
    "wo",
    "Wqkv",
    "in_proj",
}


PARITY_FAILED = "PARITY-FAILED.txt"  # in export/gguf/ when a GGUF failed its serving check (the files are kept)


class ServingParityError(UserError):
    """A GGUF does not serve as the model was trained: exit 2, the files kept for inspection and marked failed."""


class FidelityError(RunError):
    """The merged (or re-loaded) model does not reproduce the unmerged one: exit 1, one line."""


# ---------------------------------------------------------------- comparing models


@dataclass
class Outputs:
    """One model's logits on the fidelity samples, flattened to the scored positions."""

    logits: torch.Tensor  # (positions, vocab or classes), fp32
    targets: torch.Tensor  # (positions,), the next token / label, IGNORE_INDEX where none


def positions(run: FinishedRun, batch: dict, logits: torch.Tensor, flat: bool = False) -> Outputs:
    """The scored positions of `batch`: the logits at every unpadded position (`flat`: already cut to them, as
    plain_load saves them) with their next-token targets; a classifier's logits with its labels."""
    logits = logits.float().cpu()
    if run.recipe.task == "classification":
        return Outputs(logits, batch["labels"].cpu())
    mask = batch["attention_mask"].bool().cpu()
    labels = batch["labels"].cpu()
    return Outputs(logits if flat else logits[mask], tokens.next_token_targets(labels)[mask])


def loss(out: Outputs) -> float:
    """Mean cross-entropy over the scored targets (trained tokens; a classifier's labels)."""
    keep = tokens.is_target(out.targets)
    return torch.nn.functional.cross_entropy(out.logits[keep], out.targets[keep]).item()


def perplexity(out: Outputs) -> float:
    return tokens.perplexity(loss(out))


def compare(ref: Outputs, other: Outputs) -> dict:
    """How far `other` is from `ref`: max |logit diff|, mean KL(ref || other), perplexity change, greedy agreement."""
    log_p, log_q = ref.logits.log_softmax(-1), other.logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)  # >= 0; rounding can dip a hair below
    ppl_ref, ppl_other = perplexity(ref), perplexity(other)
    return {
        "max_abs_logit_diff": (ref.logits - other.logits).abs().max().item(),
        "mean_kl": kl.mean().item(),
        "perplexity_change": ppl_other - ppl_ref,
        "perplexity_change_relative": (ppl_other - ppl_ref) / ppl_ref,
        "greedy_agreement": (ref.logits.argmax(-1) == other.logits.argmax(-1)).float().mean().item(),
    }


def forward(run: FinishedRun, model, batch: dict) -> Outputs:
    """`model`'s outputs on the scored positions of `batch`, FORWARD_ROWS rows at a time."""
    device = next(model.parameters()).device
    parts = []
    with torch.no_grad():
        for start in range(0, len(batch["input_ids"]), FORWARD_ROWS):
            rows = {k: v[start : start + FORWARD_ROWS] for k, v in batch.items()}
            logits = model(**{k: v.to(device) for k, v in rows.items() if k != "labels"}).logits
            parts.append(positions(run, rows, logits))
    return Outputs(torch.cat([p.logits for p in parts]), torch.cat([p.targets for p in parts]))


# ---------------------------------------------------------------- serving compatibility


def serving_warnings(config: dict) -> list[str]:
    """Why common adapter servers (vLLM-style) would refuse or mis-serve this adapter; empty if none."""
    warnings = []
    if config.get("modules_to_save"):
        warnings.append(
            f"modules_to_save ({', '.join(dict.fromkeys(config['modules_to_save']))}): vLLM loads only lora_A/lora_B weights and refuses adapters that carry fully trained modules; serve the merged export instead"
        )
    if config.get("use_dora"):
        warnings.append(
            "DoRA: vLLM and TGI/LoRAX implement plain LoRA only (no magnitude vector); serve the merged export instead"
        )
    rank = max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])
    if rank > VLLM_RANKS[-1]:
        warnings.append(
            f"rank {rank}: vLLM's --max-lora-rank stops at {VLLM_RANKS[-1]}; lower lora.rank or serve the merged export"
        )
    elif rank > 16:
        need = next(r for r in VLLM_RANKS if r >= rank)
        warnings.append(
            f"rank {rank}: above vLLM's default --max-lora-rank 16; start it with --max-lora-rank {need} (more memory per adapter slot)"
        )
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    odd = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in VLLM_TARGETS)
    if odd:
        warnings.append(
            f"target modules {', '.join(odd)}: outside the decoder linear layers vLLM's LoRA covers ({', '.join(sorted(VLLM_TARGETS)[:9])}, ...); it would refuse or ignore them"
        )
    if config.get("trainable_token_indices"):
        warnings.append(
            "added special tokens (trainable_token_indices): vLLM's LoRA loads only lora_A/lora_B, not the trained token rows, and the base's vocabulary lacks the tokens; serve the merged export (its vocabulary and tokenizer hold them)"
        )
    if config.get("bias", "none") != "none":
        warnings.append(
            f"bias={config['bias']}: vLLM serves bias terms only with --enable-lora-bias, other servers not at all"
        )
    return warnings


# ---------------------------------------------------------------- peak memory


@contextlib.contextmanager
def peak_memory(record: dict):
    """Peak memory of the block: CUDA allocator peak, or the process's peak RSS (reset first, Linux)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        yield
        record.update(
            peak_memory_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1), peak_memory_kind="cuda_allocated"
        )
        return
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
        kind = "cpu_peak_rss"
    except OSError:
        kind = "cpu_peak_rss_since_process_start"
    yield
    if status.is_file():
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        record.update(peak_memory_mb=round(int(hwm.split()[1]) / 1024, 1), peak_memory_kind=kind)
    else:
        import resource

        record.update(
            peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            peak_memory_kind="cpu_peak_rss_since_process_start",
        )


# ---------------------------------------------------------------- loading an export with plain libraries


def load_plain(
    run: FinishedRun,
    batch: dict,
    loads: dict[str, tuple[str, str | None]],
    dtype: str,
    max_new_tokens: int = 8,
    n_prompts: int = 2,
    quantized: tuple[str, ...] = (),
) -> dict[str, tuple[Outputs, dict]]:
    """Run plain_load.py in one fresh interpreter on exported folders, {name: (model, adapter or None)};
    per name, the logits and what it generated or predicted. The loads named in `quantized` load their base with
    the BitsAndBytesConfig the run trained with (`model.quantization_config`), as the card's 4-bit snippet does."""
    from safetensors.torch import load_file, save_file

    from lora_sft.model.load import quantization_config

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        save_file({k: batch[k].contiguous() for k in ("input_ids", "attention_mask")}, str(tmp / "inputs.safetensors"))
        labels = run.checked.labels
        head = tokens.label_config(labels) if labels else {}
        prompts = []
        if run.recipe.task == "causal_lm":
            for ids, targets, mask in zip(
                batch["input_ids"][:n_prompts].tolist(),
                batch["labels"][:n_prompts].tolist(),
                batch["attention_mask"][:n_prompts].tolist(),
            ):
                # the prompt: up to the first trained token (label 0 is never a target), or the first half of
                # the sample when every token is trained (text rows, train_on_inputs); never empty
                first = tokens.first_target(targets)
                prompts.append(ids[:first] if first > 1 else ids[: max(1, sum(mask) // 2)])
        job = {
            "kind": run.recipe.task,
            "dtype": dtype,
            "inputs": str(tmp / "inputs.safetensors"),
            "prompts": prompts,
            "max_new_tokens": max_new_tokens,
            # a plain base must be told its new head's labels; a merged folder's config has them
            "loads": [
                {
                    "model": m,
                    "adapter": a,
                    "resize_to": run.plan.vocab_rows if a else None,
                    "config_overrides": head if a else {},
                    "quantization": quantization_config(run.recipe.quant, run.plan.heads).to_dict()  # type: ignore[union-attr]
                    if name in quantized
                    else None,
                    # bitsandbytes' CPU path dequantizes every layer for every generated token: its logits suffice
                    "generate": name not in quantized,
                    "out": str(tmp / name),
                }
                for name, (m, a) in loads.items()
            ],
        }
        (tmp / "job.json").write_text(json.dumps(job))
        script = Path(__file__).with_name("plain_load.py")
        proc = subprocess.run(
            [sys.executable, "-I", str(script), str(tmp / "job.json")], capture_output=True, text=True
        )
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            raise FidelityError(f"an export does not load with plain transformers/peft ({', '.join(loads)}): {last}")
        results = {}
        for name in loads:
            result = json.loads((tmp / name / "result.json").read_text())
            if result["lora_sft_imported"]:
                raise FidelityError(
                    "the plain load check imported lora_sft; it must run with plain transformers/peft only"
                )
            if "generated" in result:
                result["generated_text"] = [
                    run.tokenizer.decode(g, skip_special_tokens=False) for g in result.pop("generated")
                ]
            logits = load_file(str(tmp / name / "logits.safetensors"))["logits"]
            results[name] = (positions(run, batch, logits, flat=True), result)
    return results


# ---------------------------------------------------------------- merging


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
        if getattr(state, "packing_format_for_cpu", False):  # load_base keeps layers out of this layout
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


def unmerged_model(run: FinishedRun, dtype: ExportDtype, onto: MergeOnto, trained=None):
    """The base + adapter in `dtype`, before the merge: the base's original weights, or (dequantized) the weights as
    trained, taken from `trained` (the 4-bit base + adapter; loaded when not given). `.merge_and_unload()` merges
    it with peft (LoRA, rsLoRA, DoRA, a classifier head): a plain transformers model for `save_merged`."""
    model = run.model(dtype)
    if onto == "dequantized":
        take_trained_weights(model, trained if trained is not None else run.model())
    return model


def save_merged(run: FinishedRun, full, folder: Path, max_shard_size: int | str = "2GB") -> int:
    """Write a merged model as `export --merged` does (sharded safetensors, config, generation config, tokenizer
    and chat template; the card comes later); returns the bytes of its weights."""
    if run.recipe.task == "causal_lm":
        full.generation_config.eos_token_id = run.tokenizer.eos_token_id
        full.generation_config.pad_token_id = run.tokenizer.pad_token_id
    full.config.use_cache = True
    from lora_sft.run.progress import bars_on_terminal_only

    with bars_on_terminal_only():
        full.save_pretrained(folder, max_shard_size=max_shard_size)
    run.tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in full.parameters())


# ---------------------------------------------------------------- the export


def samples_words(samples: int, train_samples: int) -> str:
    """What the fidelity samples are: held out, train rows (no eval split), or both (a small eval split)."""
    if not train_samples:
        return f"{samples} held-out samples"
    if train_samples == samples:
        return f"{samples} train rows (the run has no eval split: not held out)"
    return (
        f"{samples} samples ({samples - train_samples} held-out, {train_samples} train rows: the eval split is small)"
    )


def _card_sections(report: dict) -> str:
    lines = [
        "## Fidelity",
        "",
        f"{samples_words(report['samples'], report.get('train_samples', 0))}, {report['positions']} scored positions, tolerance {report['tolerance']:.3g} ({report.get('tolerance_rule', '')}); "
        f"(a) {report['models']['a']}, (b) {report['models']['b']}"
        + (f", (c) {report['models']['c']}" if "c" in report["models"] else "")
        + ".",
        "",
        "| pair | max abs logit diff | mean KL | perplexity change | greedy agreement |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pair, m in report["pairs"].items():
        lines.append(
            f"| {pair} | {m['max_abs_logit_diff']:.3g} | {m['mean_kl']:.3g} | {m['perplexity_change']:+.4g} | {m['greedy_agreement']:.4f} |"
        )
    if "merge_onto" in report:
        lines += ["", *_merge_section(report["merge_onto"])]
    if report.get("gguf"):
        from lora_sft.export.gguf import card_section

        lines += ["", card_section(report["gguf"]).rstrip("\n")]
    lines += ["", "## Serving", ""]
    lines += [f"- warning: {w}" for w in report["serving_warnings"]] or [
        "No known refusal by vLLM-style adapter servers."
    ]
    return "\n".join(lines) + "\n"


def _merge_section(onto: dict) -> list[str]:
    """The card's account of the merge: which weights the exported model was merged onto, why, and both merges
    against the model as trained."""
    agreement = next(k for k in onto["dequantized"] if k.endswith("_agreement"))
    lines = [
        "## Merge",
        "",
        f"The merged model was merged onto the **{onto['exported']}** weights: {onto['why']}.",
        "",
        f"Measured on {onto['data']}:",
        "",
        f"| merged onto | max abs logit diff to the trained model | {agreement.replace('_', ' ')} | loss | perplexity |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode in ONTO:
        m = onto[mode]
        name = f"{mode} (exported)" if mode == onto["exported"] else mode
        lines.append(
            f"| {name} | {m['max_abs_logit_diff']:.3g} | {m[agreement]:.4f} | {m['loss']:.4f} | {m['perplexity']:.4f} |"
        )
    trained = onto["trained"]
    lines.append(
        f"| (the model as trained: 4-bit base + adapter) | 0 | 1 | {trained['loss']:.4f} | {trained['perplexity']:.4f} |"
    )
    return lines


def _base_reference(run: FinishedRun) -> tuple[str, str]:
    """What a snippet passes to from_pretrained for the base, and a comment line when it needs one."""
    source, name = run.plan.source, run.recipe.model.path
    if source.gguf is not None:
        return (
            source.path,
            f"# the GGUF base ({source.gguf.name}) as the model folder lora_sft converted it to: transformers loads a\n"
            "# GGUF itself (gguf_file=) only unquantized, and cannot give it a BitsAndBytesConfig\n",
        )
    if Path(name).expanduser().exists():
        return f"path/to/{Path(name).name}", ""
    return name, ""


def use_it(run: FinishedRun, report: dict, merged: bool) -> str | None:
    """The cards' "Use it" section of a causal LM: the ways to load the export, closest to the model as trained
    first, each with its measured distance (max |logit diff|, greedy agreement on the fidelity samples)."""
    if run.recipe.task != "causal_lm":
        return None
    from lora_sft.model.load import compute_dtype

    base, note = _base_reference(run)
    dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}[report["dtype"]]
    head = "from transformers import AutoModelForCausalLM, AutoTokenizer"
    adapter = 'model = PeftModel.from_pretrained(base, "path/to/adapter")\ntokenizer = AutoTokenizer.from_pretrained("path/to/adapter")'
    if json.loads((run.adapter / ADAPTER_CONFIG).read_text()).get("trainable_token_indices"):
        adapter = (
            'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")\n'
            "# the run added special tokens: the base needs embedding rows for them before the adapter loads\n"
            "base.resize_token_embeddings(len(tokenizer))\n"
            'model = PeftModel.from_pretrained(base, "path/to/adapter")'
        )
    options = []
    if "adapter_4bit" in report["loaded_plain"]:
        q = run.recipe.quant
        settings = (
            "load_in_8bit=True"
            if q.mode == "int8"
            else f'load_in_4bit=True,\n    bnb_4bit_quant_type="{q.mode}",\n    bnb_4bit_use_double_quant={q.double_quant},\n    bnb_4bit_compute_dtype={compute_dtype(q)},'
        )
        code = (
            f"import torch\nfrom peft import PeftModel\n{head}, BitsAndBytesConfig\n\n"
            f"quantization = BitsAndBytesConfig(\n    {settings}\n    llm_int8_skip_modules={run.plan.heads!r},\n)\n"
            f'{note}base = AutoModelForCausalLM.from_pretrained("{base}", quantization_config=quantization)\n{adapter}'
        )
        options.append(
            (report["loaded_plain"]["adapter_4bit"]["vs_a"], f"the base in {q.mode} as trained + the adapter", code)
        )
    if merged:
        code = f'import torch\n{head}\n\nmodel = AutoModelForCausalLM.from_pretrained("path/to/merged", dtype={dtype})\ntokenizer = AutoTokenizer.from_pretrained("path/to/merged")'
        options.append((report["pairs"]["a_vs_c"], f"the merged model ({report['dtype']})", code))
    code = f'import torch\nfrom peft import PeftModel\n{head}\n\n{note}base = AutoModelForCausalLM.from_pretrained("{base}", dtype={dtype})\n{adapter}'
    options.append((report["pairs"]["a_vs_b"], f"the unquantized base ({report['dtype']}) + the adapter", code))
    options.sort(key=lambda o: o[0]["max_abs_logit_diff"])
    lines = [
        "## Use it",
        "",
        f"Closest to the model as trained first (measured by the export on {samples_words(report['samples'], report.get('train_samples', 0))}):",
        "",
    ]
    for i, (m, what, code) in enumerate(options, 1):
        lines += [
            f"{i}. {what}: max |logit diff| {m['max_abs_logit_diff']:.3g}, greedy agreement {m['greedy_agreement']:.4f}",
            "",
            "```python",
            code,
            "```",
            "",
        ]
    return "\n".join(lines)


def _with_use_it(card: str, section: str | None) -> str:
    """`card` with its "## Use it" section (up to "## Recipe") replaced by `section`."""
    if section is None or "## Use it" not in card:
        return card
    before, rest = card.split("## Use it", 1)
    return before + section + "\n## Recipe" + rest.split("## Recipe", 1)[1]


def _merged_card(adapter_card: str, task: str, sections: str) -> str:
    """The merged model's card from the adapter's: its base_model metadata (absent for a local base) and body."""
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    header, body = adapter_card.removeprefix("---\n").split("\n---\n", 1)
    base_line = next((line + "\n" for line in header.splitlines() if line.startswith("base_model: ")), "")
    title = next(line for line in body.splitlines() if line.startswith("# LoRA adapter for "))
    body = body.replace(title, f"# {title.removeprefix('# LoRA adapter for ')} with a LoRA adapter merged in", 1)
    body = (
        body.split("## Use it")[0]
        + f"""## Use it

```python
from transformers import {auto}, AutoTokenizer

model = {auto}.from_pretrained("path/to/merged")
tokenizer = AutoTokenizer.from_pretrained("path/to/merged")
```

"""
        + "## Recipe"
        + body.split("## Recipe", 1)[1]
    )
    tags = ["lora_sft", "merged-lora", "text-classification" if task == "classification" else "text-generation"]
    return f"---\n{base_line}library_name: transformers\ntags: {json.dumps(tags)}\n---\n{body}\n{sections}"


def shard_bytes(size: int | str) -> int:
    """`--max-shard-size` in bytes: an int, digits, or a number with a unit (200KB, 2GB, 1GiB); UserError otherwise."""
    from transformers.utils.hub import convert_file_size_to_int

    text = str(size).strip()
    try:
        value = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(
            f"--max-shard-size: {size!r} is not a size; give bytes or a number with a unit, e.g. 2GB, 500MB, 200KB, 1GiB"
        )
    return value


def is_export(folder: Path) -> bool:
    """An earlier lora_sft export: marked, or (from before the marker) a fidelity.json that export wrote."""
    return ExportDir(folder).is_export()


def check_out(run_root: Path, out: Path) -> None:
    """Refuse an export folder that would remove or overwrite anything but an earlier export (one line, nothing written)."""
    fix = f"give --out a new folder, or leave it out to write {run_root / EXPORT}"
    if out == run_root / EXPORT:
        check_writable(out, "--out", "--out")
        return  # the run's own export folder
    if out == run_root or out in run_root.parents:
        raise UserError(
            f"--out {out}: {'is' if out == run_root else 'holds'} the run directory {run_root}; an export never replaces the run it reads: {fix}"
        )
    for name in ARTIFACTS:
        if name != EXPORT and (out == run_root / name or run_root / name in out.parents):
            raise UserError(
                f"--out {out}: {'is' if out == run_root / name else 'is inside'} the run's {name}; an export never writes into the run it reads: {fix}"
            )
    for place, what in (
        (Path("/"), "the root folder"),
        (Path.home(), "your home folder"),
        (Path.cwd(), "the working directory"),
    ):
        if out == place.resolve() or out in place.resolve().parents:
            raise UserError(f"--out {out}: {'is' if out == place.resolve() else 'holds'} {what}; {fix}")
    check_writable(out, "--out", "--out")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise UserError(
            f"--out {out}: the folder is not empty ({entries(out)}) and holds no lora_sft export; an export replaces only an earlier export: {fix}"
        )


@contextlib.contextmanager
def staged(out: Path):
    """A staging folder beside `out`, renamed into place when the block succeeds (an earlier export moved aside,
    then removed); on any failure the staging folder (and any parent folder made for it) is removed and `out`
    is as it was."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
            for folder in made:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()


def export(
    run_dir: str | Path,
    merged: bool = False,
    dtype: ExportDtype | None = None,
    out: str | Path | None = None,
    samples: int = 8,
    tolerance: float | None = None,
    max_shard_size: int | str = "2GB",
    gguf: str | None = None,
    log=print,
    onto: MergeOnto | None = None,
    max_drift: float | None = None,
) -> dict:
    """`onto`: what --merged merges the adapter onto; None is the default, dequantized (given without --merged, an
    error). `dtype` None: 16-bit (`default_dtype`). `gguf`: GGUF types, comma-separated, or auto with `max_drift`."""
    shard_size = shard_bytes(max_shard_size)
    from lora_sft.export.gguf import parse_types

    gguf_types = parse_types(gguf, max_drift) if gguf else []
    merged = merged or bool(gguf)  # GGUF is written from the merged model (so --gguf takes --onto too)
    if onto is not None and onto not in ONTO:
        raise UserError(f"--onto: {onto!r} is not a merge target; give one of {', '.join(ONTO)}")
    if onto is not None and not merged:
        raise UserError(
            f"--onto {onto}: says what the merged model is merged onto, and there is none without --merged; add --merged or leave --onto out"
        )
    if samples < 1:
        raise UserError(f"--samples: {samples} is too small; give 1 or more")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--tolerance: {tolerance} is not a tolerance; give a finite number of 0 or more, e.g. 1e-4")
    run = open_run(run_dir).unpacked()  # the fidelity samples one per row, as plain transformers gets them
    dtype = dtype or default_dtype(run)
    out = Path(out).expanduser().resolve() if out else run.root / EXPORT
    check_out(run.root, out)
    if gguf:
        from lora_sft.export.gguf import check_quantizer
        from lora_sft.export.gguf_write import check_ready

        check_ready(run.plan.config.to_dict(), run.recipe.task)
        check_quantizer(gguf_types)
    with staged(out) as staging:
        report = _write(
            run,
            staging,
            out,
            merged,
            onto or "dequantized",
            dtype,
            samples,
            tolerance,
            shard_size,
            log,
            gguf_types,
            max_drift,
        )
    if report.get("gguf") and not report["gguf"]["passed"]:
        failed = report["gguf"]["problems"]
        raise ServingParityError(
            f"the GGUF export failed its serving check: {failed[0]}{f' (and {len(failed) - 1} more)' if len(failed) > 1 else ''}; the files are kept for inspection in {out / 'gguf'}, marked failed ({PARITY_FAILED}, fidelity.json passed: false), and push refuses them"
        )
    log(f"exported: {out}")
    hub = run.recipe.hub
    if hub.repo_id and hub.after == "export":
        from lora_sft.export.hub import push

        push(out, hub.repo_id, private=hub.private, revision=hub.revision, log=log)
    return report


def default_dtype(run: FinishedRun) -> ExportDtype:
    """The export's dtype when --dtype is not given: bf16 where the base's config is bf16, else fp16 (16 bits, as the
    peers write; fp32 doubles the size for a difference the fidelity report shows to be rounding)."""
    dtype = getattr(run.plan.config, "dtype", None) or getattr(run.plan.config, "torch_dtype", None)
    return "bf16" if str(dtype).removeprefix("torch.") == "bfloat16" else "fp16"


def _write(
    run: FinishedRun,
    staging: Path,
    out: Path,
    merged: bool,
    onto: MergeOnto,
    dtype: ExportDtype,
    samples: int,
    tolerance: float | None,
    max_shard_size: int,
    log,
    gguf: list[str] | tuple[str, ...] = (),
    max_drift: float | None = None,
) -> dict:
    """Write the export into `staging`; raises FidelityError (nothing is then kept) when a check fails."""
    folder = ExportDir(staging)
    folder.mark(run.root)  # first
    merged_dir, adapter_dir = folder.merged, folder.adapter
    atol, rtol = TOLERANCE[dtype]
    batch, held = _fidelity_batch(run, samples)
    report: dict = {
        "run_dir": str(run.root),
        "dtype": dtype,
        "samples": len(batch["input_ids"]),
        "held_out": held == len(batch["input_ids"]),
        "train_samples": len(batch["input_ids"]) - held,
        "models": {
            "a": f"{run.recipe.quant.mode} base + adapter, as trained",
            "b": f"unquantized {dtype} base + adapter, unmerged",
        },
    }
    trained = run.model()
    outputs = {"a": forward(run, trained, batch)}
    report["positions"] = int(outputs["a"].targets.numel())

    memory: dict = {}
    with peak_memory(memory):
        model_b = run.model(dtype)
        outputs["b"] = forward(run, model_b, batch)
        if merged:  # merges model_b in place: it is not used again
            in_memory, weight_bytes = _merge_both(run, trained, model_b, batch, dtype, onto, merged_dir, max_shard_size)
        del model_b
    del trained
    scale = outputs["b"].logits.abs().max().item()
    # the rounding of the trained model to `dtype`: (d), the weights as trained in `dtype`, unmerged, vs (a)
    rounding = (in_memory["d"].logits - outputs["a"].logits).abs().max().item() if merged else 0.0
    tol = tolerance if tolerance is not None else atol + rtol * scale + ROUNDING_MARGIN * rounding
    report["tolerance"] = tol
    report["tolerance_rule"] = (
        "set with --tolerance"
        if tolerance is not None
        else f"{atol:g} + {rtol:g} x max |logit| ({scale:.3g})"
        + (
            f" + {ROUNDING_MARGIN} x the {dtype} rounding of the trained model (max |d - a| {rounding:.3g})"
            if merged
            else ""
        )
    )
    report["pairs"] = {"a_vs_b": compare(outputs["a"], outputs["b"])}
    report["perplexity"] = {k: perplexity(v) for k, v in outputs.items()}

    shutil.copytree(run.adapter, adapter_dir)
    loads: dict[str, tuple[str, str | None]] = {"adapter": (run.plan.source.path, str(adapter_dir))}
    if merged:
        loads["merged"] = (str(merged_dir), None)
    quantized = run.recipe.quant.mode != "none" and run.recipe.task == "causal_lm"
    if quantized:  # the card's first snippet: the base in 4-bit exactly as trained + the adapter
        loads["adapter_4bit"] = loads["adapter"]
    plain = load_plain(run, batch, loads, dtype, quantized=("adapter_4bit",))
    reload, result = plain["adapter"]
    report["loaded_plain"] = {"adapter": {"vs_b": compare(outputs["b"], reload), **result}}
    if quantized:
        reload4, result4 = plain["adapter_4bit"]
        report["loaded_plain"]["adapter_4bit"] = {"vs_a": compare(outputs["a"], reload4), **result4}
    problems = []
    if report["loaded_plain"]["adapter"]["vs_b"]["max_abs_logit_diff"] > tol:
        problems.append(
            f"the exported adapter loaded with plain peft differs from (b) by {report['loaded_plain']['adapter']['vs_b']['max_abs_logit_diff']:.3g} (tolerance {tol:.3g})"
        )
    if merged:
        outputs["c"], report["loaded_plain"]["merged"] = plain["merged"]
        problems += _report_merge(report, run, onto, dtype, merged_dir.name, outputs, in_memory, tol)
        memory["weights_mb"] = round(weight_bytes / 2**20, 1)
        memory["shards"] = len(list(merged_dir.glob("*.safetensors")))
        report["merged_export"] = memory

    serving: list[str] = []
    if gguf and not problems:  # the merge checks first: a GGUF of a merge that failed them is not worth serving
        from lora_sft.export.gguf import export_ggufs

        report["gguf"] = export_ggufs(run, merged_dir, folder.gguf, list(gguf), max_drift, batch, outputs["a"], log)
        conversion = report["gguf"]["conversion"].get("problems", [])
        problems += conversion  # the f16 file is not the merged model: nothing is kept
        serving = [p for p in report["gguf"]["problems"] if p not in conversion]

    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    report["serving_warnings"] = serving_warnings(adapter_config)
    report["passed"] = not problems and not serving
    report["problems"] = problems + serving
    log(format_report(report))
    for w in report["serving_warnings"]:
        log(f"serving warning: {w}")
    if problems:  # an export that failed its check is not written at all, so it cannot be shipped by mistake
        kept = "the earlier export there is unchanged" if out.exists() else "nothing was written"
        options = (
            "--tolerance X sets the bound"
            if tolerance is not None
            else f"tolerance = {report['tolerance_rule']}; --dtype fp32 merges without rounding, --tolerance X sets the bound"
        )
        raise FidelityError("; ".join(problems) + f" ({options}); {kept} ({out}); the report is printed above")
    folder.write_fidelity(FidelityReport.from_json(report))
    if serving:  # kept for inspection, marked: fidelity.json `passed` false, this file, the cards; push refuses it
        (folder.gguf / PARITY_FAILED).write_text("\n".join(serving) + "\n")

    card = run.dir.render_card(run.checked.labels)  # the run's own card (adapter/README.md), with the export's sections
    sections = _card_sections(report)
    snippets = use_it(run, report, merged)
    folder.write_cards(
        _with_use_it(card, snippets) + "\n" + sections,
        _with_use_it(_merged_card(card, run.recipe.task, sections), snippets) if merged else None,
    )
    return report


def _fidelity_batch(run: FinishedRun, samples: int) -> tuple[dict[str, torch.Tensor], int]:
    """At least `samples` rows and (causal LMs) MIN_POSITIONS tokens, at most MAX_SAMPLES rows: the eval split's
    first rows, then train rows when it is too small or missing; and how many of them are held out."""
    bundle = run.bundle()
    enough = MIN_POSITIONS if run.recipe.task == "causal_lm" else 0
    chosen: list[dict] = []
    held = seen = 0
    for data, held_out in ((bundle.eval, True), (bundle.train, False)):
        if data is None:
            continue
        for i in range(len(data)):
            if (len(chosen) >= samples and seen >= enough) or len(chosen) >= max(samples, MAX_SAMPLES):
                break
            item = data[i]
            chosen.append(item)
            held += held_out
            seen += len(item["input_ids"])
    return run.collate(chosen), held


def _merge_both(
    run: FinishedRun, trained, model_b, batch: dict, dtype: ExportDtype, onto: MergeOnto, folder: Path, shard_size: int
) -> tuple[dict[str, Outputs], int]:
    """Merge the adapter onto the original weights (model_b, merged in place) and onto the dequantized ones, save the
    `onto` one in `folder`; the outputs of both merged models in memory and of the dequantized one before its
    merge ("d"), and the bytes of the saved weights. One unquantized model is in memory at a time."""
    found: dict[str, Outputs] = {}
    weight_bytes = 0
    for mode in ("original", "dequantized"):
        unmerged = model_b if mode == "original" else unmerged_model(run, dtype, "dequantized", trained)
        if mode == "dequantized":
            found["d"] = forward(run, unmerged, batch)
        full = unmerged.merge_and_unload()
        del unmerged
        found[mode] = forward(run, full, batch)
        if mode == onto:
            weight_bytes = save_merged(run, full, folder, shard_size)
        del full
    return found, weight_bytes


def _report_merge(
    report: dict,
    run: FinishedRun,
    onto: MergeOnto,
    dtype: ExportDtype,
    folder_name: str,
    outputs: dict[str, Outputs],
    in_memory: dict[str, Outputs],
    tol: float,
) -> list[str]:
    """The merged export's entries of the report: (d) and (c), the check that (c) equals what was merged (b or d:
    returned as a problem line when it does not), (c)'s distance to the model as trained and `merge_onto`."""
    report["models"]["d"] = f"{run.recipe.quant.mode} base dequantized as trained, in {dtype}, + adapter, unmerged"
    report["models"]["c"] = (
        f"merged onto the {onto} weights, {dtype}, loaded from {folder_name}/ with plain transformers"
    )
    outputs["d"] = in_memory["d"]
    for key in ("d", "c"):
        report["perplexity"][key] = perplexity(outputs[key])
    source = "b" if onto == "original" else "d"
    check = f"{source}_vs_c"
    report["pairs"][check] = compare(outputs[source], outputs["c"])
    report["pairs"]["a_vs_c"] = compare(outputs["a"], outputs["c"])
    report["merge_onto"] = _onto_report(
        run, onto, outputs, in_memory, report["held_out"], report["samples"], report.get("train_samples", 0)
    )
    diff = report["pairs"][check]["max_abs_logit_diff"]
    if diff > tol:
        return [
            f"the merged model differs from the unmerged one ({source} vs c) by max |logit diff| {diff:.3g}, tolerance {tol:.3g}"
        ]
    return []


def _onto_report(
    run: FinishedRun,
    onto: MergeOnto,
    outputs: dict[str, Outputs],
    in_memory: dict[str, Outputs],
    held_out: bool,
    samples: int,
    train_samples: int | None = None,
) -> dict:
    """Both merges against the model as trained (a): distance, agreement, loss; which one was exported and why."""
    agreement = "label_agreement" if run.recipe.task == "classification" else "greedy_agreement"
    merges = {}
    for mode in ONTO:
        merged = outputs["c"] if mode == onto else in_memory[mode]
        gap = compare(outputs["a"], merged)
        merges[mode] = {
            "max_abs_logit_diff": gap["max_abs_logit_diff"],
            agreement: gap["greedy_agreement"],
            "loss": loss(merged),
            "perplexity": perplexity(merged),
            "measured_on": "the export, loaded back" if mode == onto else "the merge in memory (not exported)",
        }
    data = samples_words(samples, (0 if held_out else samples) if train_samples is None else train_samples)
    return {
        "exported": onto,
        "why": _why(onto, merges, samples, "held-out" if held_out else "train"),
        "data": data,
        "trained": {"loss": loss(outputs["a"]), "perplexity": perplexity(outputs["a"])},
        **merges,
    }


def _why(onto: MergeOnto, merges: dict, samples: int, data: str) -> str:
    other: MergeOnto = "original" if onto == "dequantized" else "dequantized"
    this, that = merges[onto], merges[other]
    if onto == "dequantized":
        why = (
            "the default: merged onto the 4-bit weights dequantized as in training, so the export is the model that "
            f"was trained and evaluated (max |logit diff| {this['max_abs_logit_diff']:.3g} to it; merged onto the "
            f"original weights: {that['max_abs_logit_diff']:.3g})"
        )
    else:
        why = (
            "chosen with --onto original: merged onto the base's original weights, which the 4-bit weights "
            f"approximated in training (max |logit diff| {this['max_abs_logit_diff']:.3g} to the model as trained; "
            f"merged onto the dequantized weights: {that['max_abs_logit_diff']:.3g})"
        )
    better = "lower" if this["loss"] <= that["loss"] else "higher"
    advice = "" if better == "lower" else f" (confirm it with a larger --samples; --onto {other} exports that one)"
    return f"{why}; loss on the {samples} {data} samples {this['loss']:.4f}, {better} than {that['loss']:.4f} onto the {other} weights{advice}"


def format_report(report: dict) -> str:
    lines = [
        f"fidelity on {samples_words(report['samples'], report.get('train_samples', 0))} ({report['positions']} positions), tolerance {report['tolerance']:.3g} ({report.get('tolerance_rule', '')}):"
    ]
    for key, desc in report["models"].items():
        lines.append(f"  ({key}) {desc}: perplexity {report['perplexity'][key]:.4f}")
    notes = {"a_vs_b": "  <- quantization gap", "a_vs_c": "  <- the merged export vs the model as trained"}
    for pair, m in report["pairs"].items():
        note = notes.get(pair, "")
        lines.append(
            f"  {pair}: max |logit diff| {m['max_abs_logit_diff']:.3g}, mean KL {m['mean_kl']:.3g}, perplexity change {m['perplexity_change']:+.4g}, greedy agreement {m['greedy_agreement']:.4f}{note}"
        )
    adapter = report["loaded_plain"]["adapter"]["vs_b"]
    lines.append(f"  adapter loaded with plain peft vs (b): max |logit diff| {adapter['max_abs_logit_diff']:.3g}")
    if "adapter_4bit" in report["loaded_plain"]:
        m = report["loaded_plain"]["adapter_4bit"]["vs_a"]
        lines.append(
            f"  adapter on the base quantized as trained, loaded with plain transformers + peft, vs (a): max |logit diff| {m['max_abs_logit_diff']:.3g}, greedy agreement {m['greedy_agreement']:.4f}"
        )
    if "merge_onto" in report:
        onto = report["merge_onto"]
        lines.append(f"  merged onto the {onto['exported']} weights: {onto['why']}")
        for mode in ONTO:
            m = onto[mode]
            agreement = next(k for k in m if k.endswith("_agreement"))
            lines.append(
                f"    onto {mode}: max |logit diff| to (a) {m['max_abs_logit_diff']:.3g}, {agreement.replace('_', ' ')} {m[agreement]:.4f}, loss {m['loss']:.4f} (as trained {onto['trained']['loss']:.4f})"
            )
    if "merged_export" in report:
        m = report["merged_export"]
        lines.append(
            f"  merged export: {m['weights_mb']} MB of weights in {m['shards']} shard(s), peak memory {m['peak_memory_mb']} MB ({m['peak_memory_kind']})"
        )
    if "gguf" in report:
        from lora_sft.export.gguf import report_line, serving_line

        lines.append(report_line(report["gguf"]["conversion"]))
        lines += [serving_line(f) for f in report["gguf"]["files"] if "prompts" in f or f.get("problems")]
    return "\n".join(lines)
