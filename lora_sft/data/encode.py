"""Checked rows -> tokens and labels, cut or dropped at max_length; a batch of rows with one tokenizer call.

Labels are -100 (no loss) everywhere except the tokens the recipe trains: completions, and the
turns of the trained roles (assistant by default), each turn's end-of-turn token included.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_sft.data.chats import _chat, _marked, template_name, tool_calls_rendered
from lora_sft.data.formats import Example, Options, _trained_turns, label_id
from lora_sft.errors import UserError
from lora_sft.tokens import IGNORE_INDEX as IGNORE
from lora_sft.tokens import has_target


@dataclass
class Tokenized:
    samples: list[dict]  # usually one; `text` rows longer than max_length give several chunks
    truncated: bool = False
    too_long: bool = False  # left out under truncation: drop
    untrained: bool = False  # no token carries loss after truncation
    problems: list[str] | None = None  # the row cannot be rendered or masked: its error lines


def tokenize(example: Example, tokenizer, opts: Options) -> Tokenized:
    """A causal LM example -> samples of {input_ids, labels}, cut or dropped per the options."""
    eos = tokenizer.eos_token_id
    if example.text is not None:  # continued pretraining: every token, chunked rather than cut
        return _text_chunks(tokenizer(example.text, add_special_tokens=True)["input_ids"] + [eos], opts)
    if example.messages is not None and (tokenizer.chat_template or example.prompt is None):
        from jinja2 import TemplateError

        try:
            ids, labels = _chat(tokenizer, example, opts)
        except TemplateError as e:  # a syntax error, or the template's own raise_exception on this row
            raise UserError(
                f"{example.place}: {template_name(tokenizer)} fails on this row ({type(e).__name__}: {e})"
            ) from None
    else:
        prompt = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
        ids, labels = _pair(prompt, response, eos, opts)
    return _cut(ids, labels, opts)


def _text_chunks(ids: list[int], opts: Options) -> Tokenized:
    chunks = [ids[i : i + opts.max_length] for i in range(0, len(ids), opts.max_length)]
    return Tokenized([{"input_ids": c, "labels": list(c)} for c in chunks if len(c) > 1])


def _pair(prompt: list[int], response: list[int], eos: int, opts: Options) -> tuple[list[int], list[int]]:
    """A prompt and its response, the response trained and ended with EOS."""
    response = [*response, eos]
    return prompt + response, (prompt if opts.train_on_inputs else [IGNORE] * len(prompt)) + response


def _cut(ids: list[int], labels: list[int], opts: Options) -> Tokenized:
    """A sample longer than max_length cut (or dropped, per data.truncation)."""
    if len(ids) > opts.max_length:
        if opts.truncation == "drop":
            return Tokenized([], too_long=True)
        ids, labels = ids[: opts.max_length], labels[: opts.max_length]
        if not has_target(labels):
            return Tokenized([], truncated=True, untrained=True)
        return Tokenized([{"input_ids": ids, "labels": labels}], truncated=True)
    return Tokenized([{"input_ids": ids, "labels": labels}])


def tokenize_classification(example: Example, tokenizer, opts: Options, labels: list[str]) -> Tokenized:
    enc = tokenizer(example.text, example.text_pair)
    if len(enc["input_ids"]) <= opts.max_length:
        return Tokenized([{**{k: list(v) for k, v in enc.items()}, "labels": label_id(example, labels)}])
    if opts.truncation == "drop":
        return Tokenized([], too_long=True)
    enc = tokenizer(example.text, example.text_pair, truncation=True, max_length=opts.max_length)
    return Tokenized([{**{k: list(v) for k, v in enc.items()}, "labels": label_id(example, labels)}], truncated=True)


def tokenize_one(example: Example, tokenizer, opts: Options, labels: list[str] | None) -> Tokenized:
    """`tokenize` (or `tokenize_classification` with labels) of one row; a row the template cannot render or
    mask gives its problem lines instead of raising, so they are reported with the others."""
    try:
        if labels is not None:
            return tokenize_classification(example, tokenizer, opts, labels)
        return tokenize(example, tokenizer, opts)
    except UserError as e:
        return Tokenized([], problems=e.problems)


def _uses_chat(example: Example, tokenizer) -> bool:
    """Whether `tokenize` renders the example with the chat template (else: prompt and response, or text)."""
    return (
        example.text is None
        and example.messages is not None
        and bool(tokenizer.chat_template or example.prompt is None)
    )


def tokenize_batch(examples: list[Example], tokenizer, opts: Options, labels: list[str] | None) -> list[Tokenized]:
    """`tokenize_one` of each row, the same samples and masks, with the tokenizer called once for the batch where
    the rows allow it: plain text, prompt and response pairs, and chats whose template marks the assistant's
    tokens ({% generation %}). Other rows, and a batch the template or tokenizer fails on, go row by row (so a
    failing row reports its own problem)."""
    out: list[Tokenized | None] = [None] * len(examples)
    if labels is None:
        try:
            _batch_texts(examples, tokenizer, opts, out)
            _batch_pairs(examples, tokenizer, opts, out)
            _batch_marked_chats(examples, tokenizer, opts, out)
        except Exception:  # any failure: every row of the batch once more, row by row, with its own message
            out = [None] * len(examples)
    return [r if r is not None else tokenize_one(e, tokenizer, opts, labels) for e, r in zip(examples, out)]


def _batch_texts(examples: list[Example], tokenizer, opts: Options, out: list) -> None:
    at = [i for i, e in enumerate(examples) if e.text is not None]
    if at:
        eos = tokenizer.eos_token_id
        encoded = tokenizer([examples[i].text for i in at], add_special_tokens=True)["input_ids"]
        for i, ids in zip(at, encoded):
            out[i] = _text_chunks([*ids, eos], opts)


def _batch_pairs(examples: list[Example], tokenizer, opts: Options, out: list) -> None:
    at = [i for i, e in enumerate(examples) if e.text is None and not _uses_chat(e, tokenizer)]
    if at:
        eos = tokenizer.eos_token_id
        prompts = tokenizer([examples[i].prompt for i in at], add_special_tokens=True)["input_ids"]
        responses = tokenizer([examples[i].response for i in at], add_special_tokens=False)["input_ids"]
        for i, prompt, response in zip(at, prompts, responses):
            out[i] = _cut(*_pair(prompt, response, eos, opts), opts)


def _batch_marked_chats(examples: list[Example], tokenizer, opts: Options, out: list) -> None:
    template = tokenizer.chat_template
    if not template or "{% generation %}" not in template or opts.train_on_inputs:
        return
    at, turns = [], []
    for i, e in enumerate(examples):
        if _uses_chat(e, tokenizer):
            try:
                trained = _trained_turns(e, opts)
                tool_calls_rendered(tokenizer, e)
            except UserError:
                continue  # left for the row-by-row path, which reports it
            if all(e.chat[t]["role"] == "assistant" for t in trained):
                at.append(i)
                turns.append(trained)
    if not at:
        return
    encoded = tokenizer.apply_chat_template(
        [examples[i].chat for i in at], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    for k, i in enumerate(at):
        try:
            ids, labels = _marked(
                tokenizer, examples[i], turns[k], list(encoded["input_ids"][k]), list(encoded["assistant_masks"][k])
            )
        except UserError:
            continue
        out[i] = _cut(ids, labels, opts)
