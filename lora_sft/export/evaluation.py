"""`eval` on a finished run, and generation: the base and the fine-tuned model scored on held-out rows (the
Trainer's loss, and generated answers against the references), written to eval.md and summary.json."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_sft.run.metrics import load_metric
from lora_sft.tokens import is_target, next_token_targets, perplexity

# ---------------------------------------------------------------- `eval` on a finished run


def user_prompt(tokenizer, messages: list[dict]) -> str:
    """A chat rendered for generation with the saved chat template (the classic Alpaca prompt without one)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from lora_sft.data.formats import ALPACA_PROMPT

    return ALPACA_PROMPT.format(ctx="", instruction=messages[-1]["content"], input="")


def text_only(recipe) -> bool:
    """A run trained on `text` rows only (continued pretraining): its prompts are raw text, never a chat."""
    return recipe.data.formats() == {"text"}


def prompt_for(recipe, tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """What the model is given for a user's messages, and whether it is chat-rendered: a text-only run
    continues the last message as raw text, as it was trained; any other run gets the chat (`user_prompt`)."""
    if text_only(recipe):
        return messages[-1]["content"], False
    return user_prompt(tokenizer, messages), True


def prompt_and_reference(tokenizer, example) -> tuple[str, str, bool] | None:
    """An eval example split as in training: the prompt text the model sees, the response it should give, and
    whether the prompt is chat-rendered. None for a `text` row: it has no prompt/response split to score."""
    if example.messages is not None and (tokenizer.chat_template or example.prompt is None):
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        return user_prompt(tokenizer, example.messages[:last]), example.messages[last]["content"], True
    if example.prompt is None or example.response is None:
        return None
    return example.prompt, example.response, False


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, chat: bool = True) -> str:
    """Greedy continuation of `prompt`, special tokens dropped. A chat-rendered prompt already holds its special
    tokens; a raw one (chat False, or no chat template) gets them as training tokenized it."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=not (chat and tokenizer.chat_template), return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        from lora_sft.errors import UserError

        raise UserError(
            f"prompt {prompt!r} is empty: this run continues raw text (it was trained on text rows); give it some text to continue"
        )
    device = next(model.parameters()).device
    ids = ids.to(device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def score(run, model, items: list[dict]) -> dict:
    """Loss and, by task, perplexity + token accuracy (causal_lm) or accuracy + macro F1 (classification)."""
    import torch

    from lora_sft.model.loss import plain_path_reason, target_loss

    batch_size = run.recipe.train.micro_batch_size
    device = next(model.parameters()).device
    loss_sum, n_loss, correct, guesses, refs = 0.0, 0, 0, [], []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in run.collate(items[start : start + batch_size]).items()}
            if run.recipe.task != "classification" and plain_path_reason(model) is None:
                # logits only at the trained targets, a chunk at a time (lora_sft.model.loss): never positions x vocab
                scored = target_loss(model, batch, count_correct=True)
                loss_sum += float(scored.loss_sum)
                n_loss += scored.targets
                correct += scored.correct or 0
                continue
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            if run.recipe.task == "classification":
                loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
                n_loss += len(batch["labels"])
                guesses += logits.argmax(-1).tolist()
                refs += batch["labels"].tolist()
            else:
                labels = next_token_targets(batch["labels"])  # the logits at t predict the token at t + 1
                keep = is_target(labels)
                loss_sum += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
                n_loss += int(keep.sum())
                correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
    out = {"loss": loss_sum / n_loss}
    if run.recipe.task == "classification":
        return (
            out
            | load_metric("accuracy").compute(predictions=guesses, references=refs)
            | load_metric("f1").compute(predictions=guesses, references=refs, average="macro")
        )
    return out | {"perplexity": perplexity(out["loss"]), "token_accuracy": correct / n_loss}


GENERATE_BATCH = 64  # prompts generated together (greedy, left-padded): on 2 CPU cores 60 prompts take 25 s in one
# batch, 31 s in batches of 30 and 37 s in batches of 16 (SmolLM2-135M, 48 new tokens)


PROGRESS_SECONDS = 10.0  # while a batch generates, a progress line at most this often (a batch can take minutes)


class _Ticking:
    """A stopping criterion that never stops: generate's public per-token hook, used to say how far a batch is."""

    def __init__(self, tick):
        self.tick, self.tokens = tick, 0

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.tokens += 1
        self.tick(self.tokens)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_batch(
    model, tokenizer, prompts: list[tuple[str, bool]], max_new_tokens: int, progress=None, ended: list | None = None
) -> list[str]:
    """Greedy responses to (prompt, chat) pairs, GENERATE_BATCH at a time, the prompts left-padded in batches of
    similar lengths (the order of the answers is the order of the prompts); `progress(done, token)` while a batch
    generates (`token` of max_new_tokens, at most every PROGRESS_SECONDS) and after it (`token` None);
    `ended` gets, in the same order, whether each response ended with the EOS within max_new_tokens.
    Each prompt is tokenized as `generate_text` tokenizes it."""
    import torch
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    encoded = [
        tokenizer(p, add_special_tokens=not (chat and tokenizer.chat_template))["input_ids"] for p, chat in prompts
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    stops = [False] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    said = time.perf_counter()

    def tick(token: int, done: int) -> None:
        nonlocal said
        if progress is not None and time.perf_counter() - said >= PROGRESS_SECONDS:
            progress(done, token)
            said = time.perf_counter()

    for start in range(0, len(order), GENERATE_BATCH):
        chunk = order[start : start + GENERATE_BATCH]
        ticking = _Ticking(lambda token, done=start: tick(token, done))
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk], device=device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([ticking]),
            )
        for i, row in zip(chunk, generated[:, width:]):
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            stops[i] = tokenizer.eos_token_id in row.tolist()
        if progress is not None:
            progress(min(start + GENERATE_BATCH, len(order)), None)
            said = time.perf_counter()
    if ended is not None:
        ended.extend(stops)
    return out


def generation_scores(
    run, model, pairs: list[tuple[str, str, bool]], log=None, name: str = ""
) -> tuple[dict, list[str]]:
    """Generate a response for each (prompt, reference, chat) and score them with the recipe's eval.metrics;
    `log` gets a progress line after each batch of prompts."""
    e, began = run.recipe.eval, time.perf_counter()

    def progress(done: int, token: int | None) -> None:
        if log is not None:
            at = f", token {token}/{e.max_new_tokens} of the next batch" if token is not None else ""
            log(f"  generate {name}: {done}/{len(pairs)}{at} ({time.perf_counter() - began:.0f} s)")

    generated = generate_batch(model, run.tokenizer, [(p, chat) for p, _, chat in pairs], e.max_new_tokens, progress)
    return generation_metrics(e.metrics, generated, [ref for _, ref, _ in pairs]), generated


def generation_metrics(metrics: list[str], answers: list[str], references: list[str]) -> dict[str, float]:
    """`metrics` (eval.metrics) of generated `answers` against `references`."""
    scores: dict[str, float] = {}
    for metric in metrics:
        scores |= load_metric(metric).compute(predictions=answers, references=references)
    return scores


def generator(run, model, items: list[dict]) -> tuple[Any, dict[str, Any]]:
    """The model responses are generated with, and what it is. On the CPU with a quantized base: `model` (the 4-bit
    base, with or without the adapter) dequantized as bitsandbytes computes with it, the adapter merged in, in fp32,
    which is the same model within about 1e-5 (export's `dequantized` merge; measured here on the first eval samples)
    and runs at plain fp32 matmul speed, where bitsandbytes' CPU path dequantizes every layer again for every
    generated token. Elsewhere (a GPU runs 4-bit fast, and a merged copy would need memory; an unquantized base)
    `model` itself."""
    import torch

    from lora_sft.export.dequantize import take_trained_weights
    from lora_sft.export.fidelity import forward

    quantized = run.recipe.quant.mode != "none"
    if not quantized or next(model.parameters()).device.type != "cpu":
        return model, {"model": "the model as trained" if quantized else "the model as trained (unquantized)"}
    adapted = hasattr(model, "peft_config")
    fast = run.model("fp32") if adapted else run.base("fp32")
    take_trained_weights(fast, model)
    if adapted:
        fast = fast.merge_and_unload()
    fast.eval()
    batch = run.collate(items[: run.recipe.train.micro_batch_size])
    with torch.no_grad():
        diff = (forward(run, fast, batch).logits - forward(run, model, batch).logits).abs().max().item()
    what = f"the {run.recipe.quant.mode} weights dequantized{', the adapter merged,' if adapted else ''} in fp32"
    return fast, {"model": what, "max_abs_logit_diff": diff, "positions": int(batch["attention_mask"].sum())}


# what the Trainer's evaluation of the eval split measures that `score` would measure again
TRAINER_MEASURED = ("loss", "perplexity", "token_accuracy")


@dataclass(frozen=True)
class _Asked:
    """What `eval` measures each model on: the eval rows it scores, the (prompt, reference, chat) pairs it generates
    and scores, the recipe's eval.prompts it generates; `reuse`: a causal LM on the run's own eval split, whose
    loss, perplexity and token accuracy the Trainer may have measured already (TRAINER_MEASURED)."""

    items: list[dict]
    pairs: list[tuple[str, str, bool]]
    prompts: list[tuple[str, bool]]
    reuse: bool


def evaluate_run(
    run_dir, data_file: str | None = None, base: bool = False, log=print, measured: dict | None = None
) -> dict:
    """Measure the fine-tuned model (and the base, with `base`) on the eval split or `data_file`; eval.md,
    summary.json and the model card (adapter/README.md) say what was measured. `measured`: {"base" / "fine_tuned": metrics} the Trainer just measured on the same eval split
    (train's eval.after_train): a causal LM's loss, perplexity and token accuracy are taken from there, not scored
    again (the same definition, the same numbers: tests/test_eval.py), and only the generations are new."""
    from lora_sft.errors import UserError
    from lora_sft.export.reopen import open_run
    from lora_sft.run.records import Evaluation

    run = open_run(run_dir, data_file)
    held = run.bundle().eval
    items = list(held) if held is not None else []
    if not items:
        raise UserError(
            f"{run.dir.recipe}: data: the run has no eval split (data.eval / data.eval_fraction); pass --data FILE"
        )
    e, causal = run.recipe.eval, run.recipe.task == "causal_lm"
    pairs = (
        [p for ex in run.checked.eval if (p := prompt_and_reference(run.tokenizer, ex)) is not None][: e.generate]
        if causal
        else []
    )
    prompts = (
        [prompt_for(run.recipe, run.tokenizer, [{"role": "user", "content": p}]) for p in e.prompts] if causal else []
    )
    asked = _Asked(items, pairs, prompts, reuse=causal and data_file is None)
    results, samples, generation = {}, {}, {}
    for name in ("base", "fine_tuned") if base else ("fine_tuned",):
        results[name], sample, how = _evaluate_model(run, name, asked, (measured or {}).get(name) or {}, log)
        if sample is not None:
            samples[name] = sample
        if how is not None:
            generation[name] = how
    shown = [p for p, _ in prompts] if prompts else [p for p, _, _ in pairs[:3]]
    references = [None] * len(shown) if prompts else [r for _, r, _ in pairs[:3]]
    evaluation = Evaluation(
        data=str(Path(data_file).resolve()) if data_file else "eval split",
        rows=len(items),
        base=results.get("base"),
        fine_tuned=results["fine_tuned"],
        samples=[
            {"prompt": p, "reference": r, **{n: s[i] for n, s in samples.items()}}
            for i, (p, r) in enumerate(zip(shown, references))
        ],
        generation_skipped="the eval rows are `text` rows: no prompt/response pairs to score generations against"
        if causal and e.generate and not pairs
        else None,
        generation=generation or None,
    )
    from lora_sft.export.card import write_card

    run.dir.write_evaluation(evaluation, eval_markdown(run.recipe.model.path, evaluation.to_json()))
    write_card(run.dir, run.checked.labels)  # adapter/README.md reports what eval.md and summary.json now say
    log(f"wrote {run.dir.eval_report}")
    return evaluation.to_json()


def _evaluate_model(run, name: str, asked: _Asked, known: dict, log) -> tuple[dict, list | None, dict | None]:
    """One model measured (`name`: base or fine_tuned): its metrics, its sample generations and how they were
    generated (None when nothing was generated). `known`: what the Trainer measured of it."""
    model = run.model() if name == "fine_tuned" else run.base()
    model.eval()
    if asked.reuse and all(isinstance(known.get(k), float | int) for k in TRAINER_MEASURED):
        metrics = {k: known[k] for k in TRAINER_MEASURED}
    else:
        log(f"eval {name.replace('_', '-')}: scoring {len(asked.items)} rows")  # a while on a large eval split
        metrics = score(run, model, asked.items)
    sample, how = None, None
    if asked.pairs or asked.prompts:
        began = time.perf_counter()
        model, how = generator(run, model, asked.items)
        label = name.replace("_", "-")
        if asked.pairs:
            log(f"generate {label}: {len(asked.pairs)} responses with {how['model']}")
            scores, generated = generation_scores(run, model, asked.pairs, log, label)
            metrics |= scores
            sample = generated[:3]
        if asked.prompts:
            log(f"generate {label}: {len(asked.prompts)} responses to eval.prompts")
            sample = generate_batch(model, run.tokenizer, asked.prompts, run.recipe.eval.max_new_tokens)
        how["seconds"] = round(time.perf_counter() - began, 1)
    log(
        f"eval {name.replace('_', '-')}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float))
    )
    del model
    return metrics, sample, how


def eval_markdown(base_name: str, evaluation: dict) -> str:
    from lora_sft.run.records import Evaluation

    lines = [
        f"# Evaluation of the adapter on {base_name}",
        "",
        f"{evaluation['rows']} samples ({evaluation['data']}).",
        "",
    ]
    lines += Evaluation.from_json(evaluation).table()  # the same table as the model card's
    if evaluation.get("generation_skipped"):
        lines += ["", f"Generation metrics skipped: {evaluation['generation_skipped']}."]
    for name, how in (evaluation.get("generation") or {}).items():
        diff = (
            f" (max |logit diff| {how['max_abs_logit_diff']:.2g} to the model as trained, on {how['positions']} positions)"
            if "max_abs_logit_diff" in how
            else ""
        )
        lines += [
            "",
            f"{name.replace('_', '-').capitalize()} responses generated greedily with {how['model']}{diff}, in {how.get('seconds', '?')} s.",
        ]
    if evaluation["samples"]:
        lines += ["", "## Sample generations"]
        for i, s in enumerate(evaluation["samples"], 1):
            lines += ["", f"### {i}", "", "Prompt:", "", "```", s["prompt"].strip(), "```"]
            if s["reference"] is not None:
                lines += ["", f"Reference: `{s['reference']}`"]
            for name in ("base", "fine_tuned"):
                if name in s:
                    lines += ["", f"{name.replace('_', '-').capitalize()}: `{s[name]}`"]
    return "\n".join(lines) + "\n"
