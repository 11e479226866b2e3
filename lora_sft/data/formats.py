"""Row formats: check a row's fields for its format (no tokenizer needed), into an Example; classification labels.

chats.py renders a checked chat with its template and finds the trained tokens; encode.py turns an Example into
tokens and labels.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lora_sft.data.read import Row
from lora_sft.errors import UserError

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
            raise _empty(example.place, f"{names[t]}: the {m['role']} turn", " (no content, no tool_calls)")


def _empty(place: str, what: str, how: str = "") -> UserError:
    """A trained part that is empty: the row would teach the model to answer with the end-of-turn token alone."""
    return UserError(f"{place}: {what} is empty{how} and would be trained; fill it in or remove the row")


def _response(f: Fields, key: str) -> str:
    """The trained field of a prompt/response row (alpaca's output, prompt_completion's completion), not empty."""
    value = f.string(key)
    assert value is not None  # required: f.string raised otherwise
    if not value.strip():
        raise _empty(f.row.place, f"field '{f.name(key)}'", " (the model would learn to end the answer at once)")
    return value


def check_row(row: Row, fmt: str, columns: dict[str, str] | None = None, opts: Options | None = None) -> Example:
    """Validate one row's fields for `fmt`; UserError names the row and the fix. With the data
    options, a chat is also checked to have a non-empty turn to train."""
    f = Fields(row, fmt, columns or {})
    if fmt == "alpaca":
        instruction, output = f.string("instruction"), _response(f, "output")
        ctx, system = f.string("input", required=False) or "", f.string("system", required=False)
        msgs: list[dict] = ([{"role": "system", "content": system}] if system else []) + [
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
        return Example(row.place, prompt=f.string("prompt"), response=_response(f, "completion"))
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
        if isinstance(label, str) and not label.strip():  # a blank CSV cell reads as "": it would train as class ""
            raise UserError(
                f"{row.place}: field '{f.name('label')}' is blank; give the row its label or remove the row"
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


def _trained_turns(example: Example, opts: Options) -> list[int]:
    if example.trained is not None:  # alpaca and prompt_completion: the completion, whatever the options
        return example.trained
    chosen = [i for i, m in enumerate(example.chat) if m["role"] in opts.train_roles]
    if not chosen:
        raise UserError(
            f"{example.place}: no turn of the trained roles ({', '.join(opts.train_roles)}), so nothing would be trained; add one or change data.train_roles"
        )
    return chosen[-1:] if opts.train_turns == "last" else chosen
