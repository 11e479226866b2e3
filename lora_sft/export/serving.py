"""Serving parity: does a GGUF, served by llama.cpp, behave as the model that was trained?

The export's conversion check (gguf_export.check) compares the f16 file's logits with the merged folder's on the
same token ids. This check starts where a user starts: a chat. For every GGUF written, on held-out prompts, in a
child interpreter running llama-cpp-python (`create_chat_completion`, greedy: temperature 0, top_k 1, no repeat
penalty), it measures

- the prompt: the token ids llama.cpp built from the chat with the GGUF's own `tokenizer.chat_template` (rendered as
  llama-cpp-python renders it) against the ids the run trained on (the sample up to its first trained token);
  on a mismatch, the first differing token of each;
- the Ollama prompt: the Modelfile's TEMPLATE (and SYSTEM) rendered as Ollama renders it, tokenized by llama.cpp,
  against the same ids;
- the end of turn: every token the run trained as the end of a response must be an end-of-generation token of the
  GGUF (`llama_vocab_is_eog`), and where the trained model stops, the served one must not run on past the same text;
- the generations: greedy text identical to the trained model's (torch, the dequantized merge of the 4-bit model
  as trained, `evaluation.generator`), and the recipe's task metrics (eval.metrics) against the references;
- the drift: the GGUF's logits on the fidelity samples against the model as trained, (a): mean KL, perplexity
  change, max |logit diff|, next-token agreement.

A prompt, EOG or stop mismatch fails the file; drift and agreement are reported per type, and `--max-drift` turns
the mean KL into a budget (`--gguf-type auto` picks the smallest type within it).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_sft import tokens


@dataclass
class Prompts:
    """The held-out prompts of the parity check, with what the trained model did with them."""

    chats: list[list[dict] | None]  # the messages before the response (None: an instruction row, sent as text)
    texts: list[str]  # the prompt as lora_sft rendered it (the chat template, or the instruction template)
    trained_ids: list[list[int]]  # the token ids the run trained on, up to the first trained token
    references: list[str]  # the responses of the eval rows
    generated: list[str]  # the trained model's greedy responses (torch)
    stopped: list[bool]  # whether it ended its response within max_new_tokens
    trained_metrics: dict[str, float]  # the recipe's eval.metrics of `generated` against `references`
    ollama: list[str | None]  # the prompt the Modelfile's TEMPLATE renders (None: no TEMPLATE, or not a chat)
    max_new_tokens: int
    end_of_turn: list[int]  # the tokens the run trained as the last token of a response


def prompts(run, bundle, model, count: int, ollama_render=None) -> Prompts:
    """Up to `count` eval rows of `bundle` (the run's tokenized data; train rows when it has no eval split) as parity
    prompts; `model` (the model as trained, or its fast equivalent) generates the reference responses.
    `ollama_render(messages)`: the Ollama prompt."""
    from lora_sft.export.evaluation import generation_metrics, prompt_and_reference

    data, examples = (bundle.eval, run.checked.eval) if bundle.eval is not None else (bundle.train, run.checked.train)
    aligned = len(data) == len(examples)  # rows dropped by the data stage: the sample is re-tokenized instead
    chats, texts, trained, refs, eot = [], [], [], [], set()
    for i, example in enumerate(examples):
        pair = prompt_and_reference(run.tokenizer, example)
        if pair is None:
            continue
        text, reference, chat = pair
        ids = run.tokenizer(text, add_special_tokens=not (chat and run.tokenizer.chat_template))["input_ids"]
        if aligned:
            labels = data[i]["labels"]
            first = tokens.first_target(labels)
            ids = list(data[i]["input_ids"][:first])
            eot.add(end_of_turn(run.tokenizer, data[i]["input_ids"], labels))
        last = max((j for j, m in enumerate(example.messages or []) if m["role"] == "assistant"), default=None)
        chats.append(list(example.messages[:last]) if chat and last is not None else None)
        texts.append(text)
        trained.append(ids)
        refs.append(reference)
        if len(texts) == count:
            break
    e = run.recipe.eval
    generated, stopped = _reference(model, run.tokenizer, texts, chats, e.max_new_tokens)
    trained_metrics = generation_metrics(run.recipe.eval.metrics, generated, refs)
    return Prompts(
        chats=chats,
        texts=texts,
        trained_ids=trained,
        references=refs,
        generated=generated,
        stopped=stopped,
        trained_metrics=trained_metrics,
        ollama=[ollama_render(c) if ollama_render and c is not None else None for c in chats],
        max_new_tokens=e.max_new_tokens,
        end_of_turn=sorted(eot) or [run.tokenizer.eos_token_id],
    )


def end_of_turn(tokenizer, ids: list[int], labels: list[int]) -> int:
    """The token a sample trains as the end of its response: the last special token among its trained tokens
    (<|im_end|>, <|eot_id|>, </s>: a chat template may train a newline after it), else its last trained token."""
    trained = [int(t) for t, label in zip(ids, labels) if label != tokens.IGNORE_INDEX]
    special = set(tokenizer.all_special_ids)
    return next((t for t in reversed(trained) if t in special), trained[-1])


def _reference(model, tokenizer, texts, chats, max_new_tokens) -> tuple[list[str], list[bool]]:
    """The trained model's greedy responses and whether each ended (EOS) within max_new_tokens."""
    from lora_sft.export.evaluation import generate_batch

    ends: list[bool] = []
    out = generate_batch(
        model,
        tokenizer,
        [(t, c is not None) for t, c in zip(texts, chats)],
        max_new_tokens,
        ended=ends,
    )
    return out, ends


# ---------------------------------------------------------------- the child: llama-cpp-python


def _serve(job: dict) -> dict:
    """Run in the child: every prompt through llama.cpp's chat completion, the EOG flags, the sample logits."""
    import llama_cpp
    from llama_cpp import Llama

    n_ctx = max([len(s) for s in job["samples"]] + [len(p) + job["max_new_tokens"] + 8 for p in job["trained_ids"]])
    llm = Llama(
        model_path=job["gguf"], n_ctx=n_ctx + 8, logits_all=True, verbose=False, n_gpu_layers=0, seed=0, n_batch=512
    )
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out: dict[str, Any] = {"llama_cpp_python": llama_cpp.__version__, "chat_format": llm.chat_format, "served": []}
    out["eog"] = {str(t): bool(llama_cpp.llama_vocab_is_eog(vocab, t)) for t in job["end_of_turn"]}
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    for chat, text, ollama in zip(job["chats"], job["texts"], job["ollama"]):
        llm.reset()
        greedy = {
            "temperature": 0.0,
            "top_k": 1,
            "top_p": 1.0,
            "repeat_penalty": 1.0,
            "max_tokens": job["max_new_tokens"],
        }
        reply: Any  # a response dict (not streamed); llama-cpp-python types it as a union with the stream
        if chat is not None:
            reply = llm.create_chat_completion(messages=chat, **greedy)
            content = reply["choices"][0]["message"]["content"] or ""
        else:
            reply = llm.create_completion(prompt=text, **greedy)
            content = reply["choices"][0]["text"]
        n = reply["usage"]["prompt_tokens"]
        served = {
            "prompt_ids": [int(t) for t in llm.input_ids[:n]],
            "text": content.strip(),
            "finish_reason": reply["choices"][0]["finish_reason"],
        }
        if ollama is not None:
            served["ollama_ids"] = llm.tokenize(ollama.encode(), add_bos=add_bos, special=True)
        out["served"].append(served)
    logits = []
    for ids in job["samples"]:
        llm.reset()
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    np.save(job["logits"], np.concatenate(logits))
    llm.close()
    return out


def _serve_job(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    Path(job["result"]).write_text(json.dumps(_serve(job)))


def serve(gguf: Path, p: Prompts, samples: list[list[int]]) -> tuple[dict, np.ndarray] | str:
    """Run the prompts and samples through llama.cpp in a child interpreter (a crash in native code fails the check,
    not the export): what it served and the samples' logits, or why it failed."""
    from lora_sft.export.child import in_child

    with tempfile.TemporaryDirectory() as tmp:
        logits_file, result_file = Path(tmp) / "logits.npy", Path(tmp) / "result.json"
        job = {
            "gguf": str(gguf),
            "chats": p.chats,
            "texts": p.texts,
            "ollama": p.ollama,
            "trained_ids": p.trained_ids,
            "max_new_tokens": p.max_new_tokens,
            "end_of_turn": p.end_of_turn,
            "samples": samples,
            "logits": str(logits_file),
            "result": str(result_file),
        }
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        failure = in_child("lora_sft.export.serving", "_serve_job", Path(tmp) / "job.json", r"error|exception")
        if failure is None:
            return json.loads(result_file.read_text()), np.load(logits_file)
    return f"llama.cpp (llama-cpp-python) failed serving {gguf.name} ({failure})"


# ---------------------------------------------------------------- the verdict


def first_difference(tokenizer, want: list[int], got: list[int]) -> str:
    """Where two token id lists part: the position and both tokens (decoded), or the extra tail of the longer."""
    i = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))

    def show(ids: list[int]) -> str:
        return repr(tokenizer.decode(ids[i : i + 1], skip_special_tokens=False)) + (
            f" (id {ids[i]})" if i < len(ids) else ""
        )

    return f"token {i}: trained {show(want) if i < len(want) else 'end of prompt'}, served {show(got) if i < len(got) else 'end of prompt'}"


def verdict(run, gguf_type: str, p: Prompts, served: dict, drift: dict, max_drift: float | None) -> dict:
    """The parity entry of one GGUF: what matched, the task metrics, the drift; `problems` when it fails."""
    from lora_sft.export.evaluation import generation_metrics

    tok = run.tokenizer
    answers = [s["text"] for s in served["served"]]
    problems: list[str] = []
    n = len(p.texts)
    template = [s["prompt_ids"] == want for s, want in zip(served["served"], p.trained_ids)]
    if not all(template):
        i = template.index(False)
        problems.append(
            f"{gguf_type}: the prompt llama.cpp builds with the GGUF's chat template differs from the trained one on {template.count(False)} of {n} prompts (first: prompt {i}, {first_difference(tok, p.trained_ids[i], served['served'][i]['prompt_ids'])})"
        )
    ollama = [(s["ollama_ids"] == want) for s, want in zip(served["served"], p.trained_ids) if "ollama_ids" in s]
    if not all(ollama):
        i = next(j for j, s in enumerate(served["served"]) if "ollama_ids" in s and s["ollama_ids"] != p.trained_ids[j])
        problems.append(
            f"{gguf_type}: the prompt the Modelfile's TEMPLATE builds differs from the trained one on {ollama.count(False)} of {len(ollama)} prompts (first: prompt {i}, {first_difference(tok, p.trained_ids[i], served['served'][i]['ollama_ids'])})"
        )
    not_eog = [int(t) for t, is_eog in served["eog"].items() if not is_eog]
    if not_eog:
        problems.append(
            f"{gguf_type}: the end-of-turn token the run trained ({', '.join(repr(tok.decode([t])) for t in not_eog)}) is not an end-of-generation token of the GGUF: llama.cpp would not stop there"
        )
    ran_on = [
        i
        for i, (s, ref, ended) in enumerate(zip(served["served"], p.generated, p.stopped))
        if ended and s["finish_reason"] == "length" and s["text"].startswith(ref) and len(s["text"]) > len(ref)
    ]
    if ran_on:
        problems.append(
            f"{gguf_type}: on {len(ran_on)} of {n} prompts llama.cpp wrote the trained model's response and did not stop there (first: prompt {ran_on[0]}, {served['served'][ran_on[0]]['text'][:80]!r})"
        )
    if max_drift is not None and drift["mean_kl"] > max_drift:
        problems.append(
            f"{gguf_type}: mean KL {drift['mean_kl']:.3g} to the model as trained is above --max-drift {max_drift:g}"
        )
    scores = generation_metrics(run.recipe.eval.metrics, answers, p.references)
    return {
        "prompts": n,
        "chat_format": served["chat_format"],
        "llama_cpp_python": served["llama_cpp_python"],
        "template_identical": sum(template),
        "ollama_template_identical": sum(ollama) if ollama else None,
        "ollama_prompts": len(ollama),
        "end_of_turn": {tok.decode([int(t)]): is_eog for t, is_eog in served["eog"].items()},
        "stopped": sum(s["finish_reason"] == "stop" for s in served["served"]),
        "trained_stopped": sum(p.stopped),
        "generation_identical": sum(a == g for a, g in zip(answers, p.generated)),
        "metrics": scores,
        "trained_metrics": p.trained_metrics,
        "drift": drift,
        "samples": [
            {"prompt": p.texts[i][-200:], "trained": p.generated[i], "served": answers[i]} for i in range(min(3, n))
        ],
        "passed": not problems,
        "problems": problems,
    }


def drift(ref, logits: np.ndarray) -> dict:
    """The GGUF's logits on the fidelity samples against the model as trained (fidelity.compare)."""
    from lora_sft.export.fidelity import Outputs, compare

    return compare(ref, Outputs(torch.from_numpy(logits), ref.targets))
