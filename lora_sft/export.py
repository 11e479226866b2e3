"""Export a finished run: the adapter (PEFT format), optionally the merged model, and proof they equal what was trained.

    RUN_DIR/export/            (or --out DIR)
      adapter/                 adapter_model.safetensors, adapter_config.json, tokenizer + chat template, README.md card
      merged/                  (--merged) base unquantized in --dtype with the adapter merged in: sharded
                               safetensors, config, generation config, tokenizer, README.md card
      gguf/                    (--gguf, implies --merged) <name>-<type>.gguf and an Ollama Modelfile (gguf_export.py)
      fidelity.json            the three-way comparison below, the load checks, serving warnings, peak memory

The fidelity report runs the same held-out samples through (a) the 4-bit base + adapter as trained,
(b) the unquantized base in --dtype + the adapter, unmerged, and (c) the merged model as saved, loaded
back from disk in a fresh interpreter with plain transformers. For each pair: max |logit difference|,
mean KL divergence, perplexity change and greedy next-token agreement. (b) vs (c) must agree within a
tolerance or the export fails (exit 1) and nothing is written; (a) vs (c) is the quantization
gap, reported as it is. The adapter export is loaded the same way (plain peft on the unquantized base)
and must reproduce (b).

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
from typing import Literal

import torch

from . import tokens
from .errors import RunError, UserError
from .rundir import (
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
TOLERANCE = {"fp32": (1e-4, 1e-5), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 5e-2)}
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


class FidelityError(RunError):
    """The merged (or re-loaded) model does not reproduce the unmerged one: exit 1, one line."""


# ---------------------------------------------------------------- comparing models


@dataclass
class Outputs:
    """One model's logits on the fidelity samples, flattened to the scored positions."""

    logits: torch.Tensor  # (positions, vocab or classes), fp32
    targets: torch.Tensor  # (positions,), the next token / label, IGNORE_INDEX where none


def positions(run: FinishedRun, batch: dict, logits: torch.Tensor) -> Outputs:
    logits = logits.float().cpu()
    if run.recipe.task == "classification":
        return Outputs(logits, batch["labels"].cpu())
    mask = batch["attention_mask"].bool().cpu()
    labels = batch["labels"].cpu()
    return Outputs(logits[mask], tokens.next_token_targets(labels)[mask])


def perplexity(out: Outputs) -> float:
    keep = tokens.is_target(out.targets)
    loss = torch.nn.functional.cross_entropy(out.logits[keep], out.targets[keep])
    return tokens.perplexity(loss.item())


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
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits
    return positions(run, batch, logits)


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
) -> dict[str, tuple[Outputs, dict]]:
    """Run plain_load.py in one fresh interpreter on exported folders, {name: (model, adapter or None)};
    per name, the logits and what it generated or predicted."""
    from safetensors.torch import load_file, save_file

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
            results[name] = (positions(run, batch, load_file(str(tmp / name / "logits.safetensors"))["logits"]), result)
    return results


# ---------------------------------------------------------------- the export


def _card_sections(report: dict) -> str:
    lines = [
        "## Fidelity",
        "",
        f"{report['samples']} {'held-out' if report['held_out'] else 'train (no eval split)'} samples, {report['positions']} scored positions; "
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
    if report.get("gguf"):
        from .gguf_export import card_section

        lines += ["", card_section(report["gguf"]).rstrip("\n")]
    lines += ["", "## Serving", ""]
    lines += [f"- warning: {w}" for w in report["serving_warnings"]] or [
        "No known refusal by vLLM-style adapter servers."
    ]
    return "\n".join(lines) + "\n"


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
    dtype: ExportDtype = "fp32",
    out: str | Path | None = None,
    samples: int = 8,
    tolerance: float | None = None,
    max_shard_size: int | str = "2GB",
    gguf: str | None = None,
    log=print,
) -> dict:
    shard_size = shard_bytes(max_shard_size)
    if samples < 1:
        raise UserError(f"--samples: {samples} is too small; give 1 or more")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--tolerance: {tolerance} is not a tolerance; give a finite number of 0 or more, e.g. 1e-4")
    run = open_run(run_dir).unpacked()  # the fidelity samples one per row, as plain transformers gets them
    out = Path(out).expanduser().resolve() if out else run.root / EXPORT
    check_out(run.root, out)
    if gguf:  # GGUF is written from the merged model
        from .gguf_export import check_ready

        check_ready(run.plan.config.to_dict(), run.recipe.task)
        merged = True
    with staged(out) as staging:
        report = _write(run, staging, out, merged, dtype, samples, tolerance, shard_size, log, gguf)
    log(f"exported: {out}")
    hub = run.recipe.hub
    if hub.repo_id and hub.after == "export":
        from .hub import push

        push(out, hub.repo_id, private=hub.private, revision=hub.revision, log=log)
    return report


def _write(
    run: FinishedRun,
    staging: Path,
    out: Path,
    merged: bool,
    dtype: ExportDtype,
    samples: int,
    tolerance: float | None,
    max_shard_size: int,
    log,
    gguf: str | None = None,
) -> dict:
    """Write the export into `staging`; raises FidelityError (nothing is then kept) when a check fails."""
    folder = ExportDir(staging)
    folder.mark(run.root)  # first
    merged_dir, adapter_dir = folder.merged, folder.adapter
    atol, rtol = TOLERANCE[dtype]
    bundle = run.bundle()
    held_out = bundle.eval is not None
    data = bundle.eval if bundle.eval is not None else bundle.train
    items = [data[i] for i in range(min(samples, len(data)))]
    batch = run.collate(items)

    report: dict = {
        "run_dir": str(run.root),
        "dtype": dtype,
        "samples": len(items),
        "held_out": held_out,
        "models": {
            "a": f"{run.recipe.quant.mode} base + adapter, as trained",
            "b": f"unquantized {dtype} base + adapter, unmerged",
        },
    }
    outputs = {"a": forward(run, run.model(), batch)}
    report["positions"] = int(outputs["a"].targets.numel())

    memory: dict = {}
    with peak_memory(memory):
        model_b = run.model(dtype)
        outputs["b"] = forward(run, model_b, batch)
        if merged:
            full = model_b.merge_and_unload()
            if run.recipe.task == "causal_lm":
                full.generation_config.eos_token_id = run.tokenizer.eos_token_id
                full.generation_config.pad_token_id = run.tokenizer.pad_token_id
            full.config.use_cache = True
            full.save_pretrained(merged_dir, max_shard_size=max_shard_size)
            run.tokenizer.save_pretrained(merged_dir)
            weight_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
            del full
    del model_b
    tol = tolerance if tolerance is not None else atol + rtol * outputs["b"].logits.abs().max().item()
    report["tolerance"] = tol
    report["pairs"] = {"a_vs_b": compare(outputs["a"], outputs["b"])}
    report["perplexity"] = {k: perplexity(v) for k, v in outputs.items()}

    shutil.copytree(run.adapter, adapter_dir)
    loads: dict[str, tuple[str, str | None]] = {"adapter": (run.plan.source.path, str(adapter_dir))}
    if merged:
        loads["merged"] = (str(merged_dir), None)
    plain = load_plain(run, batch, loads, dtype)
    reload, result = plain["adapter"]
    report["loaded_plain"] = {"adapter": {"vs_b": compare(outputs["b"], reload), **result}}
    problems = []
    if report["loaded_plain"]["adapter"]["vs_b"]["max_abs_logit_diff"] > tol:
        problems.append(
            f"the exported adapter loaded with plain peft differs from (b) by {report['loaded_plain']['adapter']['vs_b']['max_abs_logit_diff']:.3g} (tolerance {tol:.3g})"
        )

    if merged:
        report["models"]["c"] = f"merged {dtype}, loaded from {merged_dir.name}/ with plain transformers"
        outputs["c"], report["loaded_plain"]["merged"] = plain["merged"]
        report["perplexity"]["c"] = perplexity(outputs["c"])
        report["pairs"]["b_vs_c"] = compare(outputs["b"], outputs["c"])
        report["pairs"]["a_vs_c"] = compare(outputs["a"], outputs["c"])
        memory["weights_mb"] = round(weight_bytes / 2**20, 1)
        memory["shards"] = len(list(merged_dir.glob("*.safetensors")))
        report["merged_export"] = memory
        if report["pairs"]["b_vs_c"]["max_abs_logit_diff"] > tol:
            problems.append(
                f"the merged model differs from the unmerged one (b vs c) by max |logit diff| {report['pairs']['b_vs_c']['max_abs_logit_diff']:.3g}, tolerance {tol:.3g}"
            )

    if gguf:
        from .gguf_export import export_gguf

        ids, masks = batch["input_ids"][:4].tolist(), batch["attention_mask"][:4].tolist()
        prompts = [[t for t, m in zip(row, mask) if m] for row, mask in zip(ids, masks)]  # a few samples, unpadded
        report["gguf"] = export_gguf(merged_dir, folder.gguf, run.root.name, gguf, prompts, log)
        problems += report["gguf"].get("problems", [])

    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    report["serving_warnings"] = serving_warnings(adapter_config)
    report["passed"] = not problems
    report["problems"] = problems
    log(format_report(report))
    for w in report["serving_warnings"]:
        log(f"serving warning: {w}")
    if problems:  # an export that failed its check is not written at all, so it cannot be shipped by mistake
        kept = "the earlier export there is unchanged" if out.exists() else "nothing was written"
        raise FidelityError("; ".join(problems) + f"; {kept} ({out}); the report is printed above")
    folder.write_fidelity(FidelityReport.from_json(report))

    card = run.dir.render_card(run.checked.labels)  # the run's own card (adapter/README.md), with the export's sections
    sections = _card_sections(report)
    folder.write_cards(card + "\n" + sections, _merged_card(card, run.recipe.task, sections) if merged else None)
    return report


def format_report(report: dict) -> str:
    lines = [
        f"fidelity on {report['samples']} {'held-out' if report['held_out'] else 'train'} samples ({report['positions']} positions), tolerance {report['tolerance']:.3g}:"
    ]
    for key, desc in report["models"].items():
        lines.append(f"  ({key}) {desc}: perplexity {report['perplexity'][key]:.4f}")
    for pair, m in report["pairs"].items():
        note = "  <- quantization gap" if pair == "a_vs_c" or (pair == "a_vs_b" and "c" not in report["models"]) else ""
        lines.append(
            f"  {pair}: max |logit diff| {m['max_abs_logit_diff']:.3g}, mean KL {m['mean_kl']:.3g}, perplexity change {m['perplexity_change']:+.4g}, greedy agreement {m['greedy_agreement']:.4f}{note}"
        )
    adapter = report["loaded_plain"]["adapter"]["vs_b"]
    lines.append(f"  adapter loaded with plain peft vs (b): max |logit diff| {adapter['max_abs_logit_diff']:.3g}")
    if "merged_export" in report:
        m = report["merged_export"]
        lines.append(
            f"  merged export: {m['weights_mb']} MB of weights in {m['shards']} shard(s), peak memory {m['peak_memory_mb']} MB ({m['peak_memory_kind']})"
        )
    if "gguf" in report:
        from .gguf_export import report_line

        lines.append(report_line(report["gguf"]))
    return "\n".join(lines)
