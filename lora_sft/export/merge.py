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
with `.lora_sft-export`), and of it only the files that export wrote (the marker lists them: a file of the
user's there stays). Everything is written into a staging folder inside `--out` and moved into place at the
end, so a failure (exit 1 for a failed check) leaves the earlier export as it was.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_sft.errors import UserError
from lora_sft.export.card import export_cards
from lora_sft.export.dequantize import take_trained_weights
from lora_sft.export.fidelity import FidelityError, Outputs, compare, forward, loss, perplexity
from lora_sft.export.options import (
    ONTO,
    ExportDtype,
    ExportJob,
    ExportOptions,
    MergeOnto,
    check_options,
)
from lora_sft.export.outdir import check_out, staged
from lora_sft.export.plain_check import load_plain
from lora_sft.export.reopen import FinishedRun, open_run
from lora_sft.export.report import format_report, samples_words, serving_warnings
from lora_sft.paths import resolved
from lora_sft.run.records import FidelityReport
from lora_sft.run.rundir import ADAPTER_CONFIG, EXPORT, ExportDir

# (atol, rtol) on max |logit difference| for merged vs unmerged, by export dtype: rounding the merged
# weight to the dtype is the only legitimate difference, and it grows as the dtype narrows.
TOLERANCE = {"fp32": (1e-4, 1e-5), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 5e-2)}
# A merge in a 16-bit dtype rounds every merged weight once more; the rounding of the trained model to the same dtype
# (max |d - a|, measured on the same samples) is the scale of that, so the tolerance adds twice it to the floor above.
ROUNDING_MARGIN = 2
# The fidelity verdict is taken on at least this many scored positions (causal LMs): eval rows first, then train rows
# when the eval split is too small, at most MAX_SAMPLES rows.
MIN_POSITIONS = 512
MAX_SAMPLES = 64

PARITY_FAILED = "PARITY-FAILED.txt"  # in export/gguf/ when a GGUF failed its serving check (the files are kept)


class ServingParityError(UserError):
    """A GGUF does not serve as the model was trained: exit 2, the files kept for inspection and marked failed."""


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


# ---------------------------------------------------------------- merging


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
    from lora_sft.console import bars_on_terminal_only

    with bars_on_terminal_only():
        full.save_pretrained(folder, max_shard_size=max_shard_size)
    run.tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in full.parameters())


# ---------------------------------------------------------------- the export


def export(run_dir: str | Path, options: ExportOptions, log=print) -> dict:
    """Export the finished run in `run_dir` as `options` say; the fidelity report (what fidelity.json holds)."""
    shard_size, gguf_types, merged = check_options(options)
    run = open_run(run_dir).unpacked()  # the fidelity samples one per row, as plain transformers gets them
    job = ExportJob(
        out=resolved(options.out, f"--out {options.out}") if options.out else run.root / EXPORT,
        merged=merged,
        onto=options.onto or "dequantized",
        dtype=options.dtype or default_dtype(run),
        samples=options.samples,
        tolerance=options.tolerance,
        shard_size=shard_size,
        gguf=tuple(gguf_types),
        max_drift=options.max_drift,
    )
    check_out(run.root, job.out)
    if job.gguf:
        from lora_sft.export.gguf import check_quantizer
        from lora_sft.export.gguf_write import check_ready

        check_ready(run.plan.config.to_dict(), run.recipe.task)
        check_quantizer(list(job.gguf))
    with staged(run.root, job.out) as staging:
        report = _write(run, staging, job, log)
    if report.get("gguf") and not report["gguf"]["passed"]:
        failed = report["gguf"]["problems"]
        raise ServingParityError(
            f"the GGUF export failed its serving check: {failed[0]}{f' (and {len(failed) - 1} more)' if len(failed) > 1 else ''}; the files are kept for inspection in {job.out / 'gguf'}, marked failed ({PARITY_FAILED}, fidelity.json passed: false), and push refuses them"
        )
    log(f"exported: {job.out}")
    hub = run.recipe.hub
    if hub.repo_id and hub.after == "export":
        from lora_sft.export.hub import push

        push(job.out, hub.repo_id, private=hub.private, revision=hub.revision, log=log)
    return report


def default_dtype(run: FinishedRun) -> ExportDtype:
    """The export's dtype when --dtype is not given: bf16 where the base's config is bf16, else fp16 (16 bits, as the
    peers write; fp32 doubles the size for a difference the fidelity report shows to be rounding)."""
    dtype = getattr(run.plan.config, "dtype", None) or getattr(run.plan.config, "torch_dtype", None)
    return "bf16" if str(dtype).removeprefix("torch.") == "bfloat16" else "fp16"


# ---------------------------------------------------------------- the fidelity check


@dataclass(frozen=True)
class _Check:
    """One export's check as it goes: the run, the job, the folder it writes and the fidelity samples; the report
    and the outputs fill in as the steps measure."""

    run: FinishedRun
    job: ExportJob
    folder: ExportDir
    batch: dict[str, torch.Tensor]
    report: dict
    outputs: dict[str, Outputs] = field(default_factory=dict)  # (a), (b), then (c) and (d)
    in_memory: dict[str, Outputs] = field(default_factory=dict)  # --merged: (d) and both merges, in memory


def _write(run: FinishedRun, staging: Path, job: ExportJob, log) -> dict:
    """Write the export into `staging`; raises FidelityError (nothing is then kept) when a check fails."""
    folder = ExportDir(staging)
    folder.mark(run.root)  # first
    batch, held = _fidelity_batch(run, job.samples)
    check = _Check(run, job, folder, batch, _report_head(run, job.dtype, batch, held))
    report, outputs = check.report, check.outputs
    memory, weight_bytes = _measure(check)
    tol = _tolerance(check)
    report["pairs"] = {"a_vs_b": compare(outputs["a"], outputs["b"])}
    report["perplexity"] = {k: perplexity(v) for k, v in outputs.items()}
    problems = _load_back(check, tol)
    if job.merged:
        problems += _report_merge(check, tol)
        memory["weights_mb"] = round(weight_bytes / 2**20, 1)
        memory["shards"] = len(list(folder.merged.glob("*.safetensors")))
        report["merged_export"] = memory
    serving: list[str] = []
    if job.gguf and not problems:  # the merge checks first: a GGUF of a merge that failed them is not worth serving
        from lora_sft.export.gguf_files import GGUFJob, export_ggufs

        gguf_job = GGUFJob(folder.merged, folder.gguf, list(job.gguf), job.max_drift)
        report["gguf"] = export_ggufs(run, gguf_job, batch, outputs["a"], log)
        conversion = report["gguf"]["conversion"].get("problems", [])
        problems += conversion  # the f16 file is not the merged model: nothing is kept
        serving = [p for p in report["gguf"]["problems"] if p not in conversion]
    _conclude(check, problems, serving, log)
    folder.write_cards(*export_cards(run, report, job.merged))
    return report


def _report_head(run: FinishedRun, dtype: ExportDtype, batch: dict, held: int) -> dict:
    """The report's first entries: the run, the dtype, the fidelity samples and the two models always measured."""
    return {
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


def _measure(check: _Check) -> tuple[dict, int]:
    """(a) the model as trained, (b) the unquantized base + adapter in the export dtype and (--merged) both merges,
    measured in memory; the peak memory of the unquantized part, and the bytes of the merged weights saved."""
    run, batch = check.run, check.batch
    trained = run.model()
    check.outputs["a"] = forward(run, trained, batch)
    check.report["positions"] = int(check.outputs["a"].targets.numel())

    memory: dict = {}
    weight_bytes = 0
    with peak_memory(memory):
        model_b = run.model(check.job.dtype)
        check.outputs["b"] = forward(run, model_b, batch)
        if check.job.merged:  # merges model_b in place: it is not used again
            weight_bytes = _merge_both(check, trained, model_b)
        del model_b
    del trained
    return memory, weight_bytes


def _tolerance(check: _Check) -> float:
    """The bound on max |logit diff| of what was merged vs the merged export, and (in the report) how it was set."""
    job, outputs = check.job, check.outputs
    atol, rtol = TOLERANCE[job.dtype]
    scale = outputs["b"].logits.abs().max().item()
    # the rounding of the trained model to `dtype`: (d), the weights as trained in `dtype`, unmerged, vs (a)
    rounding = (check.in_memory["d"].logits - outputs["a"].logits).abs().max().item() if job.merged else 0.0
    tol = job.tolerance if job.tolerance is not None else atol + rtol * scale + ROUNDING_MARGIN * rounding
    check.report["tolerance"] = tol
    check.report["tolerance_rule"] = (
        "set with --tolerance"
        if job.tolerance is not None
        else f"{atol:g} + {rtol:g} x max |logit| ({scale:.3g})"
        + (
            f" + {ROUNDING_MARGIN} x the {job.dtype} rounding of the trained model (max |d - a| {rounding:.3g})"
            if job.merged
            else ""
        )
    )
    return tol


def _load_back(check: _Check, tol: float) -> list[str]:
    """The exports loaded back with plain libraries (plain_check): the adapter on the unquantized base (and, a
    quantized causal LM, on the base quantized as trained) and the merged folder; (c) is the merged one. A problem
    line when the adapter does not reproduce (b)."""
    run, report, outputs, folder = check.run, check.report, check.outputs, check.folder
    shutil.copytree(run.adapter, folder.adapter)
    loads: dict[str, tuple[str, str | None]] = {"adapter": (run.plan.source.path, str(folder.adapter))}
    if check.job.merged:
        loads["merged"] = (str(folder.merged), None)
    quantized = run.recipe.quant.mode != "none" and run.recipe.task == "causal_lm"
    if quantized:  # the card's first snippet: the base in 4-bit exactly as trained + the adapter
        loads["adapter_4bit"] = loads["adapter"]
    plain = load_plain(run, check.batch, loads, check.job.dtype, quantized=("adapter_4bit",))
    reload, result = plain["adapter"]
    report["loaded_plain"] = {"adapter": {"vs_b": compare(outputs["b"], reload), **result}}
    if quantized:
        reload4, result4 = plain["adapter_4bit"]
        report["loaded_plain"]["adapter_4bit"] = {"vs_a": compare(outputs["a"], reload4), **result4}
    if check.job.merged:
        outputs["c"], report["loaded_plain"]["merged"] = plain["merged"]
    if report["loaded_plain"]["adapter"]["vs_b"]["max_abs_logit_diff"] > tol:
        return [
            f"the exported adapter loaded with plain peft differs from (b) by {report['loaded_plain']['adapter']['vs_b']['max_abs_logit_diff']:.3g} (tolerance {tol:.3g})"
        ]
    return []


def _conclude(check: _Check, problems: list[str], serving: list[str], log) -> None:
    """The verdict: the report printed, then fidelity.json written, or (a failed check) FidelityError and nothing
    kept. A GGUF that failed only its serving check is kept, marked."""
    report, folder, out = check.report, check.folder, check.job.out
    adapter_config = json.loads((folder.adapter / ADAPTER_CONFIG).read_text())
    report["serving_warnings"] = serving_warnings(adapter_config)
    report["passed"] = not problems and not serving
    report["problems"] = problems + serving
    log(format_report(report))
    for w in report["serving_warnings"]:
        log(f"serving warning: {w}")
    if problems:  # an export that failed its check is not written at all, so it cannot be shipped by mistake
        kept = "the earlier export there is unchanged" if ExportDir(out).is_export() else "nothing was written"
        options = (
            "--tolerance X sets the bound"
            if check.job.tolerance is not None
            else f"tolerance = {report['tolerance_rule']}; --dtype fp32 merges without rounding, --tolerance X sets the bound"
        )
        raise FidelityError("; ".join(problems) + f" ({options}); {kept} ({out}); the report is printed above")
    folder.write_fidelity(FidelityReport.from_json(report))
    if serving:  # kept for inspection, marked: fidelity.json `passed` false, this file, the cards; push refuses it
        (folder.gguf / PARITY_FAILED).write_text("\n".join(serving) + "\n")


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


def _merge_both(check: _Check, trained, model_b) -> int:
    """Merge the adapter onto the original weights (model_b, merged in place) and onto the dequantized ones, save the
    `onto` one in the merged folder; the outputs of both merged models in memory and of the dequantized one before
    its merge ("d") go to `check.in_memory`; returns the bytes of the saved weights. One unquantized model is in
    memory at a time."""
    run, batch, job = check.run, check.batch, check.job
    found = check.in_memory
    weight_bytes = 0
    for mode in ("original", "dequantized"):
        unmerged = model_b if mode == "original" else unmerged_model(run, job.dtype, "dequantized", trained)
        if mode == "dequantized":
            found["d"] = forward(run, unmerged, batch)
        full = unmerged.merge_and_unload()
        del unmerged
        found[mode] = forward(run, full, batch)
        if mode == job.onto:
            weight_bytes = save_merged(run, full, check.folder.merged, job.shard_size)
        del full
    return weight_bytes


def _report_merge(check: _Check, tol: float) -> list[str]:
    """The merged export's entries of the report: (d) and (c), the check that (c) equals what was merged (b or d:
    returned as a problem line when it does not), (c)'s distance to the model as trained and `merge_onto`."""
    run, job, report, outputs = check.run, check.job, check.report, check.outputs
    report["models"]["d"] = f"{run.recipe.quant.mode} base dequantized as trained, in {job.dtype}, + adapter, unmerged"
    report["models"]["c"] = (
        f"merged onto the {job.onto} weights, {job.dtype}, loaded from {check.folder.merged.name}/ with plain transformers"
    )
    outputs["d"] = check.in_memory["d"]
    for key in ("d", "c"):
        report["perplexity"][key] = perplexity(outputs[key])
    source = "b" if job.onto == "original" else "d"
    pair = f"{source}_vs_c"
    report["pairs"][pair] = compare(outputs[source], outputs["c"])
    report["pairs"]["a_vs_c"] = compare(outputs["a"], outputs["c"])
    sampled = FidelitySamples(report["samples"], report["held_out"], report.get("train_samples", 0))
    report["merge_onto"] = _onto_report(run, job.onto, outputs, check.in_memory, sampled)
    diff = report["pairs"][pair]["max_abs_logit_diff"]
    if diff > tol:
        return [
            f"the merged model differs from the unmerged one ({source} vs c) by max |logit diff| {diff:.3g}, tolerance {tol:.3g}"
        ]
    return []


@dataclass(frozen=True)
class FidelitySamples:
    """What the fidelity samples are: how many, whether all are held out, and how many are train rows (None: all of
    them when not held out, else none)."""

    samples: int
    held_out: bool
    train_samples: int | None = None


def _onto_report(
    run: FinishedRun,
    onto: MergeOnto,
    outputs: dict[str, Outputs],
    in_memory: dict[str, Outputs],
    sampled: FidelitySamples,
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
    samples, held_out, train_samples = sampled.samples, sampled.held_out, sampled.train_samples
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
