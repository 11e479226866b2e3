"""Row formats: check a row's fields (no tokenizer needed), then turn it into tokens and labels.

Labels are -100 (no loss) everywhere except the tokens the recipe trains: completions, and the
turns of the trained roles (assistant by default), each turn's end-of-turn token included.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lora_sft.data.read import Row
from lora_sft.errors import UserError
from lora_sft.tokens import IGNORE_INDEX as IGNORE
from lora_sft.tokens import has_target

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}
FIELDS = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "classification": ("text", "label"),
}
SHAREGPT_LIST = "conversations"  # ShareGPT's name for a chat's list of turns, which format messages also reads


def fitting_formats(value: dict) -> list[str]:
    """The formats whose fields a row has, the most specific kept: a row with text and label is classification
    (text alone would fit too). `init` detects a data file's format with it."""
    keys = set(value)
    fits = [f for f, need in FIELDS.items() if set(need) <= keys or (f == "messages" and SHAREGPT_LIST in keys)]
    return [f for f in fits if not any(set(FIELDS[f]) < set(FIELDS[g]) for g in fits)]


# The classic Alpaca prompt, used for alpaca rows when the tokenizer has no chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


@dataclass
class Example:
    """A checked row. Chats carry `messages` and the indices of the trained ones; plain pairs carry
    `prompt`/`response`; `text` rows train on everything; classification rows carry a label."""

    place: str
    messages: list[dict] | None = None
    trained: list[int] | None = None  # indices into messages that carry loss; None: decided by the options
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    text_pair: str | None = None
    label: str | int | None = None
    seq: int = 0  # the row's position in the recipe's data (sources, files, lines in order): problems are reported in this order

    @property
    def chat(self) -> list[dict]:
        """The messages of a chat example (callers have checked that it is one)."""
        assert self.messages is not None, f"{self.place} is not a chat"
        return self.messages


@dataclass(frozen=True)
class Options:
    """The data options tokenization depends on (picklable, for worker processes)."""

    max_length: int
    truncation: str
    train_on_inputs: bool
    train_turns: str
    train_roles: tuple[str, ...]


class Fields:
    """A row seen through the source's column mapping: `get('output')` reads the user's column."""

    def __init__(self, row: Row, fmt: str, columns: dict[str, str]):
        assert row.value is not None, "rows that could not be read are reported, never checked"
        self.row, self.fmt, self.columns = row, fmt, columns
        self.value: dict = row.value

    def name(self, key: str) -> str:
        return self.columns.get(key, key)

    def get(self, key: str):
        return self.value.get(self.name(key))

    def string(self, key: str, required: bool = True) -> str | None:
        value = self.get(key)
        if value is None and not required:
            return None
        if value is None:
            need = ", ".join(self.name(k) for k in FIELDS[self.fmt])
            raise UserError(
                f"{self.row.place}: missing field '{self.name(key)}' (format {self.fmt} needs {need}; map other column names with columns:)"
            )
        if not isinstance(value, str):
            raise UserError(f"{self.row.place}: field '{self.name(key)}' must be a string, not {type(value).__name__}")
        return value


def _message_list(f: Fields, key: str, value) -> list[dict]:
    place = f.row.place
    if not isinstance(value, list) or not value:
        raise UserError(f"{place}: field '{key}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise UserError(f"{place}: {key}[{i}] must be an object with role and content")
        if "from" in m and "role" not in m:  # ShareGPT: {from: human|gpt|system, value}
            role = SHAREGPT_ROLES.get(m["from"])
            if role is None:
                raise UserError(
                    f"{place}: {key}[{i}].from: unknown role {m['from']!r}; use one of {', '.join(SHAREGPT_ROLES)}"
                )
            m = {"role": role, "content": m.get("value")}
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{place}: {key}[{i}].role: unknown role {role!r}; use one of {', '.join(ROLES)}")
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise UserError(f"{place}: {key}[{i}].tool_calls must be a list of objects, not {type(calls).__name__}")
        if not isinstance(content, str) and not (content is None and calls):
            raise UserError(f"{place}: {key}[{i}].content must be a string (or null with tool_calls)")
        out.append(dict(m))
    return out


def _messages(f: Fields) -> tuple[str, list[dict]]:
    key = f.name("messages")
    value = f.value.get(key)
    if value is None and "messages" not in f.columns and SHAREGPT_LIST in f.value:
        key, value = SHAREGPT_LIST, f.value[SHAREGPT_LIST]
    if value is None:
        raise UserError(
            f"{f.row.place}: missing field '{key}' (format messages needs a list of {{role, content}}, or ShareGPT conversations)"
        )
    return key, _message_list(f, key, value)


def _check_trained(example: Example, names: list[str], opts: Options) -> None:
    """A chat must have a turn to train, and no trained turn may be empty (it would teach the model to say nothing)."""
    turns = (
        [i for i, m in enumerate(example.chat) if m["role"] == "assistant"]
        if opts.train_on_inputs
        else _trained_turns(example, opts)
    )
    for t in turns:
        m = example.chat[t]
        if not (m.get("content") or "").strip() and not m.get("tool_calls"):
            raise UserError(
                f"{example.place}: {names[t]}: the {m['role']} turn is empty (no content, no tool_calls) and would be trained; fill it in or remove the row"
            )


def check_row(row: Row, fmt: str, columns: dict[str, str] | None = None, opts: Options | None = None) -> Example:
    """Validate one row's fields for `fmt`; UserError names the row and the fix. With the data
    options, a chat is also checked to have a non-empty turn to train."""
    f = Fields(row, fmt, columns or {})
    if fmt == "alpaca":
        instruction, output = f.string("instruction"), f.string("output")
        ctx, system = f.string("input", required=False) or "", f.string("system", required=False)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": f"{instruction}\n\n{ctx}" if ctx else instruction},
            {"role": "assistant", "content": output},
        ]
        prompt = ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if ctx else "",
            instruction=instruction,
            input=f"### Input:\n{ctx}\n\n" if ctx else "",
        )
        return Example(
            row.place,
            messages=msgs,
            trained=[len(msgs) - 1],
            prompt=(f"{system}\n\n" if system else "") + prompt,
            response=output,
        )
    if fmt == "prompt_completion":
        prompt, completion = f.get("prompt"), f.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational, as TRL accepts it
            if prompt is None or completion is None:
                f.string("prompt" if prompt is None else "completion")  # raises "missing field"
            head, tail = _message_list(f, f.name("prompt"), prompt), _message_list(f, f.name("completion"), completion)
            example = Example(row.place, messages=head + tail, trained=list(range(len(head), len(head) + len(tail))))
            if opts is not None:
                _check_trained(
                    example,
                    [f"{f.name('prompt')}[{i}]" for i in range(len(head))]
                    + [f"{f.name('completion')}[{i}]" for i in range(len(tail))],
                    opts,
                )
            return example
        return Example(row.place, prompt=f.string("prompt"), response=f.string("completion"))
    if fmt == "messages":
        key, msgs = _messages(f)
        example = Example(row.place, messages=msgs)
        if opts is not None:
            _check_trained(example, [f"{key}[{i}]" for i in range(len(msgs))], opts)
        return example
    if fmt == "text":
        return Example(row.place, text=f.string("text"))
    if fmt == "classification":
        text, pair, label = f.string("text"), f.string("text_pair", required=False), f.get("label")
        if label is None:
            raise UserError(
                f"{row.place}: missing field '{f.name('label')}' (format classification needs {f.name('text')}, {f.name('label')})"
            )
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise UserError(
                f"{row.place}: field '{f.name('label')}' must be a label name (string) or id (integer), not {type(label).__name__}"
            )
        return Example(row.place, text=text, text_pair=pair, label=label)
    raise AssertionError(fmt)


MAX_DERIVED_LABELS = 4096  # label ids above this need data.labels: numbering up to them would allocate a class per id


def label_names(examples: Iterable[Example], given: list[str] | None) -> list[str]:
    """The label names in id order: the recipe's list, else derived from the (train) rows, read once in order."""
    if given is not None:
        return given
    names: set[str] = set()
    ids: set[int] = set()
    first: Example | None = None
    top: Example | None = None  # the first row with the highest label id
    for e in examples:
        first = first or e
        if isinstance(e.label, str):
            names.add(e.label)
        elif isinstance(e.label, int):
            ids.add(e.label)
            if top is None or e.label > top.label:  # type: ignore[operator]
                top = e
    if names and ids:
        assert first is not None
        raise UserError(f"{first.place}: labels mix names and ids; use one kind, or list the names in data.labels")
    if top is None:
        return sorted(names)
    top_id = int(top.label)  # type: ignore[arg-type]
    if top_id >= MAX_DERIVED_LABELS:
        raise UserError(
            f"{top.place}: label id {top_id} would make {top_id + 1} classes (more than {MAX_DERIVED_LABELS}); list the labels in data.labels"
        )
    return [str(i) for i in range(top_id + 1)]


def label_id(example: Example, labels: list[str], derived: bool = False) -> int:
    """The label's id; `derived`: the labels come from the train rows, so a label not among them is seen only in eval."""
    if isinstance(example.label, int):
        if not 0 <= example.label < len(labels):
            if derived and example.label >= 0:
                raise UserError(
                    f"{example.place}: label id {example.label} is seen only in eval rows (train rows have ids 0..{len(labels) - 1}); add it to the train data or list every label in data.labels"
                )
            raise UserError(f"{example.place}: label id {example.label} is out of range (0..{len(labels) - 1})")
        return example.label
    if example.label not in labels:
        if derived:
            raise UserError(
                f"{example.place}: label {example.label!r} is seen only in eval rows (train rows have {', '.join(labels)}); add it to the train data or list every label in data.labels"
            )
        raise UserError(f"{example.place}: label {example.label!r} is not in data.labels ({', '.join(labels)})")
    return labels.index(example.label)


# ---------------------------------------------------------------- chats


def _trained_turns(example: Example, opts: Options) -> list[int]:
    if example.trained is not None:  # alpaca and prompt_completion: the completion, whatever the options
        return example.trained
    chosen = [i for i, m in enumerate(example.chat) if m["role"] in opts.train_roles]
    if not chosen:
        raise UserError(
            f"{example.place}: no turn of the trained roles ({', '.join(opts.train_roles)}), so nothing would be trained; add one or change data.train_roles"
        )
    return chosen[-1:] if opts.train_turns == "last" else chosen


def _render(tokenizer, msgs: list[dict], gen: bool = False) -> str:
    if not msgs:
        return ""
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _first_turn_header(tokenizer, example: Example, upto: str) -> str:
    """The text before a chat's first turn when that turn is the assistant's: whatever the template
    writes first (a BOS, a default system prompt) up to the end of the assistant header. The header is
    the generation prompt, as the template appends it after a probe user turn; it ends where its first
    occurrence in the rendered turn ends. A template without a generation prompt gives no exact mask,
    so the row is refused."""
    probe = [{"role": "user", "content": "x"}]
    try:
        plain, prompted = _render(tokenizer, probe), _render(tokenizer, probe, gen=True)
    except Exception:  # a template that cannot render the probe cannot tell us the header either
        plain = prompted = ""
    header = prompted[len(plain) :] if prompted.startswith(plain) else ""
    at = upto.find(header) if header else -1
    if at < 0:
        raise UserError(
            f"{example.place}: the chat starts with an assistant turn and {template_name(tokenizer)} does not show where that turn's header ends, "
            "so the header would be trained; start the chat with a user (or system) turn, or set data.chat_template (chatml, llama3, mistral)"
        )
    return upto[: at + len(header)]


def template_name(tokenizer) -> str:
    return getattr(tokenizer, "chat_template_name", None) or f"the chat template of {tokenizer.name_or_path}"


def _chat_with_markers(tokenizer, example: Example, turns: list[int]) -> tuple[list[int], list[int]]:
    """Templates with {% generation %} markers say which tokens are the assistant's."""
    out = tokenizer.apply_chat_template(
        example.chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return _marked(tokenizer, example, turns, list(out["input_ids"]), list(out["assistant_masks"]))


def _marked(
    tokenizer, example: Example, turns: list[int], ids: list[int], mask: list[int]
) -> tuple[list[int], list[int]]:
    """The labels of the trained turns, from the template's assistant-token mask of the rendered chat."""
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    n_assistant = sum(m["role"] == "assistant" for m in example.chat)
    if len(runs) != n_assistant:
        raise UserError(
            f"{example.place}: {template_name(tokenizer)} marks {len(runs)} generation blocks for {n_assistant} assistant turns; fix its {{% generation %}} markers"
        )
    assistant_turns = [i for i, m in enumerate(example.chat) if m["role"] == "assistant"]
    keep = [runs[assistant_turns.index(t)] for t in turns]
    labels = [IGNORE] * len(ids)
    for a, b in keep:
        labels[a:b] = ids[a:b]
    return ids, labels


def _chat_incremental(tokenizer, example: Example, turns: list[int]) -> tuple[list[int], list[int]]:
    """Find each trained turn's characters by rendering the chat up to it and up to just before it.

    The turn is what rendering messages[:i+1] adds to messages[:i] (with the generation prompt for
    an assistant turn, so the 'assistant' header itself is not trained). A template for which these
    prefixes do not hold would give wrong masks, so it is refused.
    """
    msgs = example.chat
    full = _render(tokenizer, msgs)
    spans = []
    for i in turns:
        before, upto = (
            _render(tokenizer, msgs[:i], gen=msgs[i]["role"] == "assistant"),
            _render(tokenizer, msgs[: i + 1]),
        )
        if i == 0 and msgs[0]["role"] == "assistant":
            before = _first_turn_header(tokenizer, example, upto)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise UserError(
                f"{example.place}: {template_name(tokenizer)} renders earlier turns differently once later turns follow, so the trained tokens "
                "cannot be located; set data.chat_template (chatml, llama3, mistral or a .jinja file with {% generation %} markers)"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if any(a <= start < b for a, b in spans) else IGNORE for t, (start, _) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels


def _chat(tokenizer, example: Example, opts: Options) -> tuple[list[int], list[int]]:
    if not tokenizer.chat_template:
        raise UserError(
            f"{example.place}: chat rows need a chat template and {tokenizer.name_or_path} has none; set data.chat_template (chatml, llama3, mistral or a .jinja file)"
        )
    try:
        return _chat_masked(tokenizer, example, opts)
    except UserError:
        raise
    except (
        Exception
    ) as e:  # the template raised on this row: jinja's TemplateError (raise_exception), TypeError (content None), ...
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(
            f"{example.place}: {template_name(tokenizer)} cannot render this chat ({type(e).__name__}: {first}); fix the row or set data.chat_template"
        ) from None


def _chat_masked(tokenizer, example: Example, opts: Options) -> tuple[list[int], list[int]]:
    if opts.train_on_inputs:
        ids = tokenizer(_render(tokenizer, example.chat), add_special_tokens=False)["input_ids"]
        return ids, list(ids)
    turns = _trained_turns(example, opts)
    if "{% generation %}" in tokenizer.chat_template and all(example.chat[t]["role"] == "assistant" for t in turns):
        return _chat_with_markers(tokenizer, example, turns)
    return _chat_incremental(tokenizer, example, turns)


# ---------------------------------------------------------------- tokens


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
