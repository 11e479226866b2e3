"""Metrics: the ones lora_sft ships load offline; any other name goes to `evaluate.load` (the hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tokens import is_target, next_token_targets, perplexity

SHIPPED = Path(__file__).parent / "metrics"


def load_metric(name: str, where: str = "eval.metrics"):
    """A metric by `evaluate` name: the copy lora_sft ships, else from the hub (refused while it is off)."""
    import evaluate

    from .errors import UserError

    if problem := metric_problem(name, where):
        raise UserError(problem)
    local = SHIPPED / name / f"{name}.py"
    return evaluate.load(str(local) if local.is_file() else name)


def metric_problem(name: str, where: str) -> str | None:
    """Why `name` cannot be loaded here, known without loading it: not shipped, and the hub is off."""
    import difflib
    import os

    from .hub import offline_variable

    shipped = sorted(p.name for p in SHIPPED.iterdir() if (p / f"{p.name}.py").is_file())
    if name in shipped:
        return None
    variable = offline_variable() or (
        "HF_EVALUATE_OFFLINE"
        if os.environ.get("HF_EVALUATE_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        else None
    )
    if variable is None:
        return None  # evaluate fetches it from the hub when it is used
    close = difflib.get_close_matches(name, shipped, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{where}: metric {name!r} does not ship with lora_sft and {variable} is set, so it cannot be fetched from the hub ({hint}shipped: {', '.join(shipped)})"


def classification_metrics():
    """A Trainer `compute_metrics` for classification: accuracy and macro F1."""
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        guesses = np.argmax(logits, axis=-1)
        return accuracy.compute(predictions=guesses, references=pred.label_ids) | f1.compute(
            predictions=guesses, references=pred.label_ids, average="macro"
        )

    return compute


# ---------------------------------------------------------------- `eval` on a finished run


def user_prompt(tokenizer, messages: list[dict]) -> str:
    """A chat rendered for generation with the saved chat template (the classic Alpaca prompt without one)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from .data.formats import ALPACA_PROMPT

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
        from .errors import UserError

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

    from .loss import plain_path_reason, target_loss

    batch_size = run.recipe.train.micro_batch_size
    device = next(model.parameters()).device
    loss_sum, n_loss, correct, guesses, refs = 0.0, 0, 0, [], []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in run.collate(items[start : start + batch_size]).items()}
            if run.recipe.task != "classification" and plain_path_reason(model) is None:
                # logits only at the trained targets, a chunk at a time (lora_sft.loss): never positions x vocab
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


def generation_scores(run, model, pairs: list[tuple[str, str, bool]]) -> tuple[dict, list[str]]:
    """Generate a response for each (prompt, reference, chat) and score them with the recipe's eval.metrics."""
    e = run.recipe.eval
    generated = [generate_text(model, run.tokenizer, prompt, e.max_new_tokens, chat) for prompt, _, chat in pairs]
    scores: dict[str, float] = {}
    for name in e.metrics:
        scores |= load_metric(name).compute(predictions=generated, references=[ref for _, ref, _ in pairs])
    return scores, generated


def evaluate_run(run_dir, data_file: str | None = None, base: bool = False, log=print) -> dict:
    """Measure the fine-tuned model (and the base, with `base`) on the eval split or `data_file`; eval.md and summary.json."""
    from .errors import UserError
    from .rundir import Evaluation, open_run

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
    results, samples = {}, {}
    for name in ("base", "fine_tuned") if base else ("fine_tuned",):
        model = run.model() if name == "fine_tuned" else run.base()
        model.eval()
        metrics = score(run, model, items)
        if pairs:
            generation, generated = generation_scores(run, model, pairs)
            metrics |= generation
            samples[name] = generated[:3]
        if prompts:
            samples[name] = [generate_text(model, run.tokenizer, p, e.max_new_tokens, chat) for p, chat in prompts]
        results[name] = metrics
        log(
            f"eval {name.replace('_', '-')}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float))
        )
        del model
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
    )
    run.dir.write_evaluation(evaluation, eval_markdown(run.recipe.model.path, evaluation.to_json()))
    log(f"wrote {run.dir.eval_report}")
    return evaluation.to_json()


def eval_markdown(base_name: str, evaluation: dict) -> str:
    from .rundir import Evaluation

    lines = [
        f"# Evaluation of the adapter on {base_name}",
        "",
        f"{evaluation['rows']} samples ({evaluation['data']}).",
        "",
    ]
    lines += Evaluation.from_json(evaluation).table()  # the same table as the model card's
    if evaluation.get("generation_skipped"):
        lines += ["", f"Generation metrics skipped: {evaluation['generation_skipped']}."]
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
