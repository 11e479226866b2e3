"""Row formats: check a row's fields (no tokenizer needed) and turn it into tokens and labels.

Causal LM rows become either a plain (prompt, response) pair or a chat (a list of messages).
Labels are -100 (no loss) everywhere except the response / assistant tokens, unless
`train_on_inputs` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .read import Row

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
FIELDS = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "classification": ("text", "label"),
}

# The classic Alpaca prompt, used for alpaca rows when the tokenizer has no chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


@dataclass
class Example:
    """A checked row: `messages` (a chat), or `prompt`/`response` text, or `text`/`label`."""

    place: str
    messages: list[dict] | None = None
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    label: str | int | None = None


def _string(row: Row, key: str, fmt: str, required: bool = True) -> str | None:
    value = row.value.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise UserError(f"{row.place}: missing field '{key}' (format {fmt} needs {', '.join(FIELDS[fmt])})")
    if not isinstance(value, str):
        raise UserError(f"{row.place}: field '{key}' must be a string, not {type(value).__name__}")
    return value


def _messages(row: Row) -> list[dict]:
    msgs = row.value.get("messages")
    if msgs is None:
        raise UserError(f"{row.place}: missing field 'messages' (format messages needs a list of {{role, content}})")
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{row.place}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UserError(f"{row.place}: messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{row.place}: messages[{i}].role: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{row.place}: messages[{i}].content must be a string")
        out.append(dict(m))
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{row.place}: no assistant message, so nothing would be trained; add one")
    return out


def check(row: Row, fmt: str) -> Example:
    """Validate one row's fields for `fmt`; UserError names the row and the fix."""
    if fmt == "alpaca":
        instruction, output = _string(row, "instruction", fmt), _string(row, "output", fmt)
        ctx, system = _string(row, "input", fmt, required=False) or "", _string(row, "system", fmt, required=False)
        user = f"{instruction}\n\n{ctx}" if ctx else instruction
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
        prompt = ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if ctx else "",
            instruction=instruction,
            input=f"### Input:\n{ctx}\n\n" if ctx else "",
        )
        return Example(row.place, messages=msgs, prompt=(f"{system}\n\n" if system else "") + prompt, response=output)
    if fmt == "prompt_completion":
        return Example(row.place, prompt=_string(row, "prompt", fmt), response=_string(row, "completion", fmt))
    if fmt == "messages":
        return Example(row.place, messages=_messages(row))
    if fmt == "classification":
        text, label = _string(row, "text", fmt), row.value.get("label")
        if label is None:
            raise UserError(f"{row.place}: missing field 'label' (format classification needs text, label)")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise UserError(f"{row.place}: field 'label' must be a label name (string) or id (integer), not {type(label).__name__}")
        return Example(row.place, text=text, label=label)
    raise AssertionError(fmt)


def label_names(examples: list[Example], given: list[str] | None) -> list[str]:
    """The label names in id order: the recipe's list, else derived from the rows."""
    if given is not None:
        return given
    names = {e.label for e in examples if isinstance(e.label, str)}
    ids = {e.label for e in examples if isinstance(e.label, int)}
    if names and ids:
        raise UserError(f"{examples[0].place}: labels mix names and ids; use one kind, or list the names in data.labels")
    return sorted(names) if names else [str(i) for i in range(max(ids) + 1)]


def label_id(example: Example, labels: list[str]) -> int:
    if isinstance(example.label, int):
        if not 0 <= example.label < len(labels):
            raise UserError(f"{example.place}: label id {example.label} is out of range (0..{len(labels) - 1})")
        return example.label
    if example.label not in labels:
        raise UserError(f"{example.place}: label {example.label!r} is not in data.labels ({', '.join(labels)})")
    return labels.index(example.label)


def _chat_spans(tokenizer, messages: list[dict], place: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat and find the character span of each assistant turn.

    Renders incrementally: the text up to assistant turn i minus the text of the prompt before it
    (with the generation prompt) is that turn, end-of-turn token included. A template for which
    these prefixes do not hold cannot be masked this way, and is refused.
    """

    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], gen=True), render(messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            name = getattr(tokenizer, "name_or_path", "the tokenizer")
            raise UserError(f"{place}: the chat template of {name} renders turns differently in prefixes, so assistant tokens cannot be located; use a template whose prefixes hold")
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize(example: Example, tokenizer, max_length: int, train_on_inputs: bool) -> tuple[dict, bool]:
    """-> ({input_ids, attention_mask, labels}, truncated) for a causal LM example."""
    if example.messages is not None and (tokenizer.chat_template or example.prompt is None):
        if not tokenizer.chat_template:
            raise UserError(f"{example.place}: format messages needs a chat template, and {tokenizer.name_or_path} has none; use a chat model's tokenizer")
        text, spans = _chat_spans(tokenizer, example.messages, example.place)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        trained = [train_on_inputs or any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
        labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
    else:
        prompt = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt + response
        labels = (prompt if train_on_inputs else [IGNORE] * len(prompt)) + response
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, truncated
