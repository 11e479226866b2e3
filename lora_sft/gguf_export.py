"""GGUF for llama.cpp / Ollama / LM Studio: the merged export converted (gguf_write.py), an Ollama Modelfile, and
a load check.

    EXPORT/gguf/
      <name>-<type>.gguf   the merged model (f16, bf16 or q8_0 weights; norms in f32), its architecture metadata,
                           the tokenizer (vocabulary, merges, special tokens) and the chat template
      Modelfile            for `ollama create`: FROM the file, the stop tokens, a TEMPLATE for chatml / llama3 /
                           mistral chat templates (others rely on the template embedded in the GGUF)

It starts from the merged folder `export --merged` writes (safetensors, config.json, tokenizer files), whatever
merged it. `check` loads the file with llama.cpp (llama-cpp-python) and compares its logits with the merged
model's in transformers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .gguf_write import INSTALL, adds, write

GREEDY_STEPS = 16
F16_RELATIVE = 1e-2  # f16: max |logit diff| <= this * max |logit|
MIN_AGREEMENT = 0.9  # bf16 / q8_0: next-token argmax agreement at least this


# ---------------------------------------------------------------- the Ollama Modelfile

# Ollama TEMPLATEs (Go templates) for the chat-template families lora_sft names (data/templates.py), with the stop
# tokens each needs besides the EOS. Ollama passes the system prompt as .System (from a chat or the Modelfile's
# SYSTEM), so it is written once, first, and system messages are skipped in .Messages. The GGUF's BOS is added by
# llama.cpp itself, so no template starts with it.
OLLAMA_TEMPLATES = {
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        "{{- end }}<|im_start|>assistant\n",
        ["<|im_end|>", "<|im_start|>"],
    ),
    "llama3": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        "{{ .Content }}<|eot_id|>{{ end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|eot_id|>", "<|start_header_id|>"],
    ),
    "mistral": (
        "{{- if .System }}{{ .System }}\n\n{{ end }}"
        '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{- else if eq .Role "assistant" }} {{ .Content }}{{ EOS }}{{- end }}{{- end }}',
        ["[INST]"],
    ),
}


def template_family(chat_template: str | None) -> str | None:
    """chatml, llama3 or mistral from the markers a chat template writes; None for any other (or none)."""
    text = chat_template or ""
    if "<|im_start|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text:
        return "llama3"
    if "[INST]" in text:
        return "mistral"
    return None


def modelfile(gguf_file: str, chat_template: str | None, eos_token: str | None) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, stop tokens, and a TEMPLATE for a known family."""
    family = template_family(chat_template)
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_file}", ""]
    stops = list(OLLAMA_TEMPLATES[family][1]) if family else []
    if eos_token and eos_token not in stops:
        stops.insert(0, eos_token)
    if family:
        template = OLLAMA_TEMPLATES[family][0].replace("{{ EOS }}", eos_token or "")
        lines += [f"# the {family} chat template, as the model was trained with", f'TEMPLATE """{template}"""', ""]
    else:
        lines += [
            "# no TEMPLATE: this chat template is not a chatml, llama3 or mistral one; Ollama renders chats",
            "# with the template embedded in the GGUF (tokenizer.chat_template)",
            "",
        ]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(merged: Path, out_dir: Path, gguf_path: Path) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    path = out_dir / "Modelfile"
    path.write_text(modelfile(gguf_path.name, template, tokenizer.eos_token))
    return path


# ---------------------------------------------------------------- the load check


def not_checked() -> dict:
    return {
        "checked": False,
        "why": f"llama-cpp-python is not installed, so the GGUF was not loaded; {INSTALL} and export again to check it",
    }


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _greedy(step, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """`steps` greedy tokens and the logits each was picked from: step(new ids) returns the last position's logits
    after feeding them."""
    out, seen, logits = [], [], step(ids)
    for _ in range(steps):
        seen.append(logits)
        out.append(int(np.argmax(logits)))
        logits = step([out[-1]])
    return out, seen


def _hf_stepper(model) -> Any:
    import torch

    state: dict = {"past": None}

    def step(new: list[int]) -> np.ndarray:
        with torch.no_grad():
            result = model(torch.tensor([new]), past_key_values=state["past"], use_cache=True)
        state["past"] = result.past_key_values
        return result.logits[0, -1].float().numpy()

    return step


def _llama_stepper(llm) -> Any:
    def step(new: list[int]) -> np.ndarray:
        llm.eval(new)
        return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)

    return step


def check(gguf_path: Path, merged: Path, gguf_type: str, prompts: list[list[int]]) -> dict:
    """Load the GGUF with llama.cpp on CPU and compare it with the merged model in transformers (fp32) on `prompts`:
    max |logit diff| at every prompt position, next-token argmax agreement, and 16 greedy tokens per prompt.

    It runs in a child interpreter: llama.cpp is native code, and a crash there (an instruction the CPU or VM does
    not allow, say) must fail the check, not kill the export before it removes its staging folder."""
    import importlib.util
    import signal
    import subprocess
    import sys
    import tempfile

    if importlib.util.find_spec("llama_cpp") is None:
        return not_checked()
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps([str(gguf_path), str(merged), gguf_type, prompts]))
        root = str(Path(__file__).resolve().parents[1])
        code = f"import sys; sys.path.insert(0, {root!r}); from lora_sft.gguf_export import _measure_job; _measure_job(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True)
        if proc.returncode == 0:
            return json.loads(job.with_suffix(".out.json").read_text())
    how = signal.Signals(-proc.returncode).name if proc.returncode < 0 else f"exit {proc.returncode}"
    last = [line for line in proc.stderr.splitlines() if re.search(r"error|assert", line, re.IGNORECASE)][-1:]
    problem = (
        f"llama.cpp (llama-cpp-python) failed running {gguf_path.name} ({how}{': ' + last[0] if last else ''}); "
        "if its build is at fault, rebuild it for this machine (CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install --force-reinstall --no-cache-dir llama-cpp-python) "
        "or uninstall it to export without the load check"
    )
    return {"checked": True, "passed": False, "problems": [problem]}


def _measure_job(job_file: str) -> None:
    job = Path(job_file)
    gguf_path, merged, gguf_type, prompts = json.loads(job.read_text())
    result = _measure(Path(gguf_path), Path(merged), gguf_type, prompts)
    job.with_suffix(".out.json").write_text(json.dumps(result))


def _measure(gguf_path: Path, merged: Path, gguf_type: str, prompts: list[list[int]]) -> dict:
    """What `check` reports, measured in this interpreter."""
    import llama_cpp
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    add_bos = adds(tokenizer)["bos"]
    n_ctx = max(len(p) for p in prompts) + GREEDY_STEPS + 8
    llm = Llama(model_path=str(gguf_path), logits_all=True, verbose=False, n_ctx=n_ctx, n_gpu_layers=0, seed=0)
    diff = scale = 0.0
    agree = positions = greedy_same = tokenized_same = 0
    greedy: list[dict] = []
    for ids in prompts:
        ref = _hf_logits(model, ids)
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        diff = max(diff, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        positions += len(ids)
        llm.reset()
        hf_tokens, hf_logits = _greedy(_hf_stepper(model), ids, GREEDY_STEPS)
        cpp_tokens, _ = _greedy(_llama_stepper(llm), ids, GREEDY_STEPS)
        greedy_same += hf_tokens == cpp_tokens
        greedy.append({"transformers": hf_tokens, "llama_cpp": cpp_tokens})
        if hf_tokens != cpp_tokens:  # how far apart transformers had the two tokens where the paths part
            i = next(i for i, (a, b) in enumerate(zip(hf_tokens, cpp_tokens)) if a != b)
            greedy[-1]["parted_at"] = i
            greedy[-1]["logit_gap"] = float(hf_logits[i][hf_tokens[i]] - hf_logits[i][cpp_tokens[i]])
        # the same text must become the same tokens in both tokenizers (each adds its BOS, if it adds one, itself)
        body = ids[1:] if add_bos and ids[:1] == [tokenizer.bos_token_id] else ids
        text = str(tokenizer.decode(body, skip_special_tokens=False))  # one sequence: a str
        tokenized_same += llm.tokenize(text.encode(), add_bos=add_bos, special=True) == tokenizer(text)["input_ids"]
    llm.close()
    result: dict[str, Any] = {
        "checked": True,
        "file": gguf_path.name,
        "type": gguf_type,
        "llama_cpp_python": llama_cpp.__version__,
        "prompts": len(prompts),
        "positions": positions,
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "relative_logit_diff": diff / scale if scale else 0.0,
        "greedy_agreement": agree / positions,
        "greedy_steps": GREEDY_STEPS,
        "greedy_identical_prompts": greedy_same,
        # prompts whose greedy paths part at a tie: the two tokens within the f16 tolerance in transformers' own logits
        "greedy_ties": sum(g.get("logit_gap", math.inf) <= F16_RELATIVE * scale for g in greedy),
        "tokenizer_identical_prompts": tokenized_same,
        "greedy": greedy,
    }
    problems = []
    if gguf_type == "f16":
        if diff > F16_RELATIVE * scale:
            problems.append(
                f"f16 GGUF max |logit diff| {diff:.3g} is above {F16_RELATIVE} * max |logit| ({F16_RELATIVE * scale:.3g})"
            )
        if (parted := len(prompts) - greedy_same - result["greedy_ties"]) > 0:
            problems.append(
                f"f16 GGUF: {GREEDY_STEPS} greedy tokens differ from transformers on {parted} of {len(prompts)} prompts (not at a tie)"
            )
    elif agree / positions < MIN_AGREEMENT:
        problems.append(
            f"{gguf_type} GGUF: next-token agreement {agree / positions:.3f} with transformers is below {MIN_AGREEMENT}"
        )
    if tokenized_same < len(prompts):
        problems.append(
            f"the GGUF's tokenizer splits {len(prompts) - tokenized_same} of {len(prompts)} prompts differently from the transformers tokenizer"
        )
    result["passed"], result["problems"] = not problems, problems
    return result


def export_gguf(merged: Path, out_dir: Path, name: str, gguf_type: str, prompts: list[list[int]], log=print) -> dict:
    """Write the GGUF and the Modelfile into out_dir and check the GGUF loads: the fidelity report's `gguf` entry."""
    path = write(merged, out_dir, name, gguf_type, log)
    write_modelfile(merged, out_dir, path)
    report = {"file": path.name, "modelfile": "Modelfile", "size_mb": round(path.stat().st_size / 2**20, 1)}
    return report | check(path, merged, gguf_type, prompts)


def report_line(entry: dict) -> str:
    if not entry.get("checked"):
        return f"  gguf {entry['file']}: not load-checked ({entry['why']})"
    if "max_abs_logit_diff" not in entry:
        return f"  gguf {entry['file']}: {'; '.join(entry['problems'])}"
    return (
        f"  gguf {entry['file']} loaded with llama.cpp vs merged: max |logit diff| {entry['max_abs_logit_diff']:.3g} "
        f"(max |logit| {entry['max_abs_logit']:.3g}), next-token agreement {entry['greedy_agreement']:.4f}, "
        f"{entry['greedy_identical_prompts']}/{entry['prompts']} prompts with identical {entry['greedy_steps']} greedy tokens"
    )


def card_section(entry: dict, folder: str = "gguf") -> str:
    """The model card's lines for the GGUF: the files and the commands to run them."""
    name = Path(entry["file"]).stem
    lines = [
        "## Run it on your laptop (GGUF)",
        "",
        f"- `{folder}/{entry['file']}` ({entry['size_mb']} MB): llama.cpp, LM Studio, Ollama",
        f"- `{folder}/Modelfile`: for Ollama",
        "",
        "```sh",
        f"llama-cli -m {folder}/{entry['file']} -cnv",
        f"cd {folder} && ollama create {name} -f Modelfile && ollama run {name}",
        "```",
        "",
    ]
    if entry.get("checked"):
        lines.append(
            f"Loaded with llama.cpp (llama-cpp-python {entry['llama_cpp_python']}): max |logit diff| {entry['max_abs_logit_diff']:.3g} "
            f"(max |logit| {entry['max_abs_logit']:.3g}), next-token agreement {entry['greedy_agreement']:.4f}, "
            f"{entry['greedy_identical_prompts']} of {entry['prompts']} prompts with identical {entry['greedy_steps']} greedy tokens"
            + (f" ({entry['greedy_ties']} more part at a tie)." if entry["greedy_ties"] else ".")
        )
    else:
        lines.append(f"Not load-checked: {entry['why']}.")
    return "\n".join(lines) + "\n"
