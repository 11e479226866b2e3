"""The GGUF files of an export (`export --gguf`): the 16-bit file converted from the merged folder and load-checked
(gguf.py), the quantized types llama.cpp's own quantizer makes from it, each served by llama.cpp and checked for
serving parity against the model as trained (serving.py), and for `--gguf-type auto` the smallest type within
the drift budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_sft.errors import RunError, UserError
from lora_sft.export import serving as gguf_serving
from lora_sft.export.evaluation import generator
from lora_sft.export.fidelity import Outputs
from lora_sft.export.gguf import QUANTIZED, check, default_system, ollama_prompt, template_family, write_modelfile
from lora_sft.export.gguf_write import file_name, write
from lora_sft.export.reopen import FinishedRun

AUTO = ("q4_k_m", "q5_k_m", "q6_k", "q8_0")  # --gguf-type auto tries these, smallest first, then the 16-bit file
# held-out prompts of the serving check: the recipe's eval.generate, at most PARITY_PROMPTS (16 when it is 0); each
# costs about a second per GGUF type in llama.cpp on 2 CPU cores (SmolLM2-135M, 48 new tokens)
PARITY_PROMPTS = 32


@dataclass(frozen=True)
class GGUFJob:
    """What `export --gguf` asks for: the merged folder to convert, the folder the files go to, the types and the
    drift budget."""

    merged: Path
    out_dir: Path
    types: list[str]  # GGUF types (gguf.parse_types), or ["auto"]
    max_drift: float | None


@dataclass(frozen=True)
class _Parity:
    """What every GGUF type is served against: the held-out prompts with the trained model's responses, and the
    fidelity samples (unpadded) with the model as trained's outputs on them."""

    prompts: gguf_serving.Prompts
    rows: list[list[int]]
    trained: Outputs


def quantize(source: Path, target: Path, gguf_type: str) -> None:
    """`source` (an f16 or bf16 GGUF) quantized to `gguf_type` by llama.cpp, in a child interpreter (native code)."""
    code = (
        "import ctypes, os, sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
        "p.ftype = getattr(llama_cpp, sys.argv[3]); p.nthread = os.cpu_count() or 1; "
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(source), str(target), QUANTIZED[gguf_type]], capture_output=True, text=True
    )
    if proc.returncode != 0 or not target.is_file():
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise RunError(f"llama.cpp could not quantize {source.name} to {gguf_type}: {last}")


def export_ggufs(run: FinishedRun, job: GGUFJob, batch: dict, trained: Outputs, log=print) -> dict:
    """The GGUF files `job.types` asks for (or, auto, the smallest within `job.max_drift`), each checked for serving
    parity (gguf_serving) against the model as trained (`trained`: its outputs on the fidelity `batch`); the fidelity
    report's `gguf` entry. The 16-bit file is written first and load-checked against the merged folder (`check`)."""
    merged, out_dir = job.merged, job.out_dir
    config = json.loads((merged / "config.json").read_text())
    base_type = "bf16" if config.get("dtype", config.get("torch_dtype")) == "bfloat16" else "f16"
    auto = job.types == ["auto"]
    ids, masks = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    rows = [[t for t, m in zip(row, mask) if m] for row, mask in zip(ids, masks)]  # the samples, unpadded
    base_path = write(merged, out_dir, run.root.name, base_type, log)
    conversion = {"file": base_path.name, "size_mb": round(base_path.stat().st_size / 2**20, 1)} | check(
        base_path, merged, base_type, rows[:4]
    )
    entry: dict[str, Any] = {"conversion": conversion, "files": [], "max_drift": job.max_drift}
    problems = list(conversion.get("problems", []))
    if not conversion.get("checked"):  # no llama-cpp-python: f16/bf16 written, nothing served
        write_modelfile(merged, out_dir, base_path)
        entry["files"].append(
            {"type": base_type, "file": base_path.name, "size_mb": conversion["size_mb"], "modelfile": "Modelfile"}
        )
        return entry | {"passed": not problems, "problems": problems}

    family, system, prompts = _parity_prompts(run, merged, log)
    parity = _Parity(prompts, rows, trained)
    for gguf_type in [*AUTO, base_type] if auto else job.types:
        path = base_path if gguf_type == base_type else out_dir / file_name(run.root.name, gguf_type)
        if gguf_type != base_type:
            quantize(base_path, path, gguf_type)
        result = _served(run, gguf_type, path, parity, job.max_drift)
        log(serving_line(result))
        entry["files"].append(result)
        if auto and result["passed"]:
            break
    if auto:
        _keep_chosen(entry, job, base_path, base_type)
    elif base_type not in job.types:
        base_path.unlink()  # the intermediate of the quantized files
    for i, f in enumerate(entry["files"]):
        f["modelfile"] = "Modelfile" if i == 0 else f"Modelfile.{f['type']}"
        write_modelfile(merged, out_dir, out_dir / f["file"], f["modelfile"])
        problems += f["problems"]
    return entry | {"passed": not problems, "problems": problems, "template_family": family, "default_system": system}


def _parity_prompts(run: FinishedRun, merged: Path, log) -> tuple[str | None, str | None, gguf_serving.Prompts]:
    """The merged folder's chat-template family and default system prompt, and the held-out parity prompts with
    the references the model as trained (or its fast equivalent, `evaluation.generator`) generates."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    family = template_family(tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None)
    system = default_system(tokenizer)
    bundle = run.bundle()
    data = bundle.eval if bundle.eval is not None else bundle.train
    model, how = generator(run, run.model(), [data[i] for i in range(min(4, len(data)))])
    count = min(run.recipe.eval.generate, PARITY_PROMPTS) or 16
    log(f"gguf serving check: {count} held-out prompts, references generated with {how['model']}")
    prompts = gguf_serving.prompts(run, bundle, model, count, lambda chat: ollama_prompt(family, system, chat))
    del model
    return family, system, prompts


def _served(run: FinishedRun, gguf_type: str, path: Path, parity: _Parity, max_drift: float | None) -> dict:
    """One GGUF served by llama.cpp: its parity entry (or why it could not be served), with its size."""
    served = gguf_serving.serve(path, parity.prompts, parity.rows)
    if isinstance(served, str):
        result = {"type": gguf_type, "file": path.name, "passed": False, "problems": [served]}
    else:
        drift = gguf_serving.drift(parity.trained, served[1])
        result = {"type": gguf_type, "file": path.name} | gguf_serving.verdict(
            run, gguf_type, parity.prompts, served[0], drift, max_drift
        )
    result["size_mb"] = round(path.stat().st_size / 2**20, 1)
    return result


def _keep_chosen(entry: dict, job: GGUFJob, base_path: Path, base_type: str) -> None:
    """--gguf-type auto: keep the first type that passed (the smallest), remove the others; UserError when none did."""
    chosen = next((f for f in entry["files"] if f["passed"]), None)
    if chosen is None:
        measured = [f for f in entry["files"] if "drift" in f]
        closest = min(measured, key=lambda f: f["drift"]["mean_kl"]) if measured else None
        near = (
            f"; closest: {closest['type']} at mean KL {closest['drift']['mean_kl']:.3g}{'' if not closest['problems'] or 'max-drift' in closest['problems'][0] else ' (' + closest['problems'][0] + ')'}"
            if closest
            else ""
        )
        raise UserError(
            f"--gguf-type auto --max-drift {job.max_drift:g}: no GGUF type ({', '.join([*AUTO, base_type])}) stays within the budget and passes the serving check{near}; raise --max-drift or export f16"
        )
    for f in entry["files"]:
        if f is not chosen:
            (job.out_dir / f["file"]).unlink(missing_ok=True)
    if chosen["type"] != base_type:
        base_path.unlink()  # the 16-bit intermediate, not tried once a smaller type passed
    entry["files"], entry["chosen"] = [chosen], chosen["type"]


def serving_line(f: dict) -> str:
    """One printed line per GGUF: the parity verdict, the task metric, the drift."""
    if "drift" not in f:
        return f"  gguf {f['file']}: {'; '.join(f['problems'])}"
    d, metrics = f["drift"], ", ".join(f"{k} {v:.3f}" for k, v in f["metrics"].items())
    trained = ", ".join(f"{v:.3f}" for v in f["trained_metrics"].values())
    return (
        f"  gguf {f['file']} ({f['size_mb']} MB) served by llama.cpp: {'PASSED' if f['passed'] else 'FAILED'}; "
        f"prompt tokens = trained on {f['template_identical']}/{f['prompts']}"
        + (f" (Ollama template {f['ollama_template_identical']}/{f['ollama_prompts']})" if f["ollama_prompts"] else "")
        + f", stops {f['stopped']}/{f['prompts']} (trained {f['trained_stopped']}), greedy text = trained {f['generation_identical']}/{f['prompts']}, "
        f"{metrics} (trained {trained}), mean KL {d['mean_kl']:.3g}, perplexity change {d['perplexity_change']:+.3g}, next-token agreement {d['greedy_agreement']:.3f}"
    )
