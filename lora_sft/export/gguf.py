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
from pathlib import Path
from typing import Any

import numpy as np

from lora_sft.export.child import in_child
from lora_sft.export.gguf_write import INSTALL, adds, write

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


# How each family's Go TEMPLATE above renders a chat, in Python (checked against the trained prompt by the serving
# check): the system turn (Ollama's .System: the chat's system message, else the Modelfile's SYSTEM), every other
# message, then the assistant's opening.
OLLAMA_TURNS = {
    "chatml": (
        "<|im_start|>system\n{}<|im_end|>\n",
        "<|im_start|>{role}\n{content}<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    "llama3": (
        "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}


def ollama_prompt(family: str | None, default_system: str | None, messages: list[dict]) -> str | None:
    """The prompt Ollama builds from `messages` with the Modelfile's TEMPLATE and SYSTEM (None where lora_sft writes
    no TEMPLATE, or for a family whose turns are not plain open/close pairs)."""
    if family not in OLLAMA_TURNS:
        return None
    system_turn, turn, opening = OLLAMA_TURNS[family]
    system = next((m["content"] for m in messages if m["role"] == "system"), default_system)
    text = system_turn.format(system) if system else ""
    text += "".join(turn.format(role=m["role"], content=m["content"]) for m in messages if m["role"] != "system")
    return text + opening


def default_system(tokenizer) -> str | None:
    """The system prompt the chat template inserts when a chat has none (SmolLM2's, Qwen2.5's): it goes into the
    Modelfile as SYSTEM, or Ollama's prompt would lack what training had."""
    family = template_family(tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None)
    if family not in OLLAMA_TURNS:
        return None
    probe = "\x01probe\x01"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": probe}], tokenize=False, add_generation_prompt=True
    )
    head, _, tail = OLLAMA_TURNS[family][0].partition("{}")
    start = text.find(head)
    if start < 0 or start > text.find(probe):
        return None
    return text[start + len(head) : text.index(tail, start + len(head))]


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


def modelfile(gguf_file: str, chat_template: str | None, eos_token: str | None, system: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, stop tokens, a TEMPLATE for a known family and, where the chat
    template inserts a default system prompt, that prompt as SYSTEM."""
    family = template_family(chat_template)
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_file}", ""]
    stops = list(OLLAMA_TEMPLATES[family][1]) if family else []
    if eos_token and eos_token not in stops:
        stops.insert(0, eos_token)
    if family:
        template = OLLAMA_TEMPLATES[family][0].replace("{{ EOS }}", eos_token or "")
        lines += [f"# the {family} chat template, as the model was trained with", f'TEMPLATE """{template}"""', ""]
        if system:
            lines += ["# the system prompt the chat template gives a chat that has none", f'SYSTEM """{system}"""', ""]
    else:
        lines += [
            "# no TEMPLATE: this chat template is not a chatml, llama3 or mistral one; Ollama renders chats",
            "# with the template embedded in the GGUF (tokenizer.chat_template)",
            "",
        ]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(merged: Path, out_dir: Path, gguf_path: Path, name: str = "Modelfile") -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    path = out_dir / name
    path.write_text(modelfile(gguf_path.name, template, tokenizer.eos_token, default_system(tokenizer)))
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
    import tempfile

    if importlib.util.find_spec("llama_cpp") is None:
        return not_checked()
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps([str(gguf_path), str(merged), gguf_type, prompts]))
        failure = in_child("lora_sft.export.gguf", "_measure_job", job, r"error|assert")
        if failure is None:
            return json.loads(job.with_suffix(".out.json").read_text())
    problem = (
        f"llama.cpp (llama-cpp-python) failed running {gguf_path.name} ({failure}); "
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
    each = [_measure_prompt(model, tokenizer, llm, ids, add_bos) for ids in prompts]
    llm.close()
    diff = max([0.0, *(m["diff"] for m in each)])
    scale = max([0.0, *(m["scale"] for m in each)])
    agree, positions = sum(m["agree"] for m in each), sum(len(ids) for ids in prompts)
    greedy = [m["greedy"] for m in each]
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
        "greedy_identical_prompts": sum(m["greedy_same"] for m in each),
        # prompts whose greedy paths part at a tie: the two tokens within the f16 tolerance in transformers' own logits
        "greedy_ties": sum(g.get("logit_gap", math.inf) <= F16_RELATIVE * scale for g in greedy),
        "tokenizer_identical_prompts": sum(m["tokenized_same"] for m in each),
        "greedy": greedy,
    }
    problems = _problems(gguf_type, result)
    result["passed"], result["problems"] = not problems, problems
    return result


def _measure_prompt(model, tokenizer, llm, ids: list[int], add_bos: bool) -> dict[str, Any]:
    """One prompt through both: the logits at every position, 16 greedy tokens each, and whether llama.cpp's
    tokenizer splits its text as transformers' does."""
    ref = _hf_logits(model, ids)
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.reset()
    hf_tokens, hf_logits = _greedy(_hf_stepper(model), ids, GREEDY_STEPS)
    cpp_tokens, _ = _greedy(_llama_stepper(llm), ids, GREEDY_STEPS)
    greedy: dict[str, Any] = {"transformers": hf_tokens, "llama_cpp": cpp_tokens}
    if hf_tokens != cpp_tokens:  # how far apart transformers had the two tokens where the paths part
        i = next(i for i, (a, b) in enumerate(zip(hf_tokens, cpp_tokens)) if a != b)
        greedy["parted_at"] = i
        greedy["logit_gap"] = float(hf_logits[i][hf_tokens[i]] - hf_logits[i][cpp_tokens[i]])
    # the same text must become the same tokens in both tokenizers (each adds its BOS, if it adds one, itself)
    body = ids[1:] if add_bos and ids[:1] == [tokenizer.bos_token_id] else ids
    text = str(tokenizer.decode(body, skip_special_tokens=False))  # one sequence: a str
    return {
        "diff": float(np.abs(got - ref).max()),
        "scale": float(np.abs(ref).max()),
        "agree": int((got.argmax(-1) == ref.argmax(-1)).sum()),
        "greedy_same": hf_tokens == cpp_tokens,
        "greedy": greedy,
        "tokenized_same": llm.tokenize(text.encode(), add_bos=add_bos, special=True) == tokenizer(text)["input_ids"],
    }


def _problems(gguf_type: str, result: dict[str, Any]) -> list[str]:
    """Why the measured GGUF fails its load check: f16 must match within F16_RELATIVE and greedily (but at a tie),
    a quantized type agree on the next token MIN_AGREEMENT of the time; any type tokenizes as transformers does."""
    diff, scale, n = result["max_abs_logit_diff"], result["max_abs_logit"], result["prompts"]
    problems = []
    if gguf_type == "f16":
        if diff > F16_RELATIVE * scale:
            problems.append(
                f"f16 GGUF max |logit diff| {diff:.3g} is above {F16_RELATIVE} * max |logit| ({F16_RELATIVE * scale:.3g})"
            )
        if (parted := n - result["greedy_identical_prompts"] - result["greedy_ties"]) > 0:
            problems.append(
                f"f16 GGUF: {GREEDY_STEPS} greedy tokens differ from transformers on {parted} of {n} prompts (not at a tie)"
            )
    elif result["greedy_agreement"] < MIN_AGREEMENT:
        problems.append(
            f"{gguf_type} GGUF: next-token agreement {result['greedy_agreement']:.3f} with transformers is below {MIN_AGREEMENT}"
        )
    if result["tokenizer_identical_prompts"] < n:
        problems.append(
            f"the GGUF's tokenizer splits {n - result['tokenizer_identical_prompts']} of {n} prompts differently from the transformers tokenizer"
        )
    return problems


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


def card_section(gguf: dict, folder: str = "gguf") -> str:
    """The model card's lines for the GGUF files: the files, the commands to run them, the conversion check and the
    serving parity table."""
    files, conversion = gguf["files"], gguf["conversion"]
    first = files[0]
    name = Path(first["file"]).stem
    lines = ["## Run it on your laptop (GGUF)", ""]
    for f in files:
        lines.append(
            f"- `{folder}/{f['file']}` ({f['size_mb']} MB): llama.cpp, LM Studio, Ollama (`{folder}/{f['modelfile']}`)"
        )
    lines += [
        "",
        "```sh",
        f"llama-cli -m {folder}/{first['file']} -cnv",
        f"cd {folder} && ollama create {name} -f {first['modelfile']} && ollama run {name}",
        "```",
        "",
    ]
    served = [f for f in files if "drift" in f]
    if served:
        metric = next(iter(served[0]["metrics"]), None)
        lines += [
            f"Served by llama.cpp (llama-cpp-python {served[0]['llama_cpp_python']}, greedy) on {served[0]['prompts']} held-out prompts, against the model as trained:",
            "",
            f"| file | parity | prompt tokens as trained | stops | greedy text as trained | {metric or 'metric'} (trained) | mean KL | perplexity change |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for f in served:
            value = f"{f['metrics'][metric]:.3f} ({f['trained_metrics'][metric]:.3f})" if metric else ""
            lines.append(
                f"| {f['file']} | {'passed' if f['passed'] else 'FAILED'} | {f['template_identical']}/{f['prompts']} | {f['stopped']}/{f['prompts']} | "
                f"{f['generation_identical']}/{f['prompts']} | {value} | {f['drift']['mean_kl']:.3g} | {f['drift']['perplexity_change']:+.3g} |"
            )
        lines.append("")
    entry = conversion
    if entry.get("checked") and "max_abs_logit_diff" in entry:
        lines.append(
            f"Loaded with llama.cpp (llama-cpp-python {entry['llama_cpp_python']}): max |logit diff| {entry['max_abs_logit_diff']:.3g} "
            f"(max |logit| {entry['max_abs_logit']:.3g}), next-token agreement {entry['greedy_agreement']:.4f}, "
            f"{entry['greedy_identical_prompts']} of {entry['prompts']} prompts with identical {entry['greedy_steps']} greedy tokens"
            + (f" ({entry['greedy_ties']} more part at a tie)." if entry["greedy_ties"] else ".")
        )
    else:
        lines.append(f"Not load-checked: {entry['why']}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the types --gguf-type takes

# The types `--gguf-type` takes, largest first. f16 and bf16 are written by gguf_write; the others by llama.cpp's own
# quantizer (llama-cpp-python's llama_model_quantize binding) from the f16 (bf16 for a bf16 export) file.
GGUF_TYPES = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
QUANTIZED = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}


def parse_types(text: str, max_drift: float | None) -> list[str]:
    """`--gguf-type`: comma-separated types, or ["auto"] (which needs --max-drift); one-line refusals."""
    from lora_sft.errors import UserError

    wanted = [t.strip().lower() for t in text.split(",") if t.strip()]
    if wanted == ["auto"]:
        if max_drift is None:
            raise UserError(
                "--gguf-type auto: picks the smallest GGUF within a drift budget; give it with --max-drift X (mean KL to the model as trained, e.g. 0.05)"
            )
        return wanted
    odd = [t for t in wanted if t not in GGUF_TYPES]
    if odd or not wanted:
        raise UserError(
            f"--gguf-type: {', '.join(odd) or repr(text)} is not a GGUF type; give one or more of {', '.join(GGUF_TYPES)} (comma-separated), or auto with --max-drift"
        )
    return list(dict.fromkeys(wanted))


def check_quantizer(types: list[str]) -> None:
    """Refuse, before anything is written, a type that needs llama.cpp's quantizer when llama-cpp-python is missing."""
    import importlib.util

    from lora_sft.errors import UserError

    need = [t for t in types if t in QUANTIZED or t == "auto"]
    if need and importlib.util.find_spec("llama_cpp") is None:
        raise UserError(
            f"--gguf-type {','.join(need)}: quantizing uses llama.cpp's own quantizer from llama-cpp-python, which is not installed; {INSTALL} (f16 and bf16 need only gguf)"
        )
