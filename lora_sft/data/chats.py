"""Chat rows: rendered with the tokenizer's chat template, and the tokens of the trained turns found exactly.

A template with {% generation %} markers says which tokens are the assistant's; any other is rendered turn by
turn, and a template for which the rendered prefixes do not hold is refused rather than given a wrong mask.
"""

from __future__ import annotations

from lora_sft.data.formats import Example, Options, _trained_turns
from lora_sft.data.templates import NAMED
from lora_sft.errors import UserError
from lora_sft.tokens import IGNORE_INDEX as IGNORE


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
    tool_calls_rendered(tokenizer, example)
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


def tool_calls_rendered(tokenizer, example: Example) -> None:
    """lora_sft's named templates (chatml, llama3, mistral) render a turn's role and content only: a turn's
    tool_calls would be dropped, or (content null) the template fails on it. Refused with the reason: tool-call
    conventions differ by model family, so the model's own template, or a .jinja file, must render them."""
    if tokenizer.chat_template not in NAMED.values():
        return
    for i, m in enumerate(example.chat):
        if m.get("tool_calls"):
            raise UserError(
                f"{example.place}: messages[{i}] has tool_calls, which {template_name(tokenizer)} does not render (it writes a turn's role "
                "and content only, so the calls would be lost); use the model's own template if it renders tool calls, or a .jinja file "
                "that does (data.chat_template)"
            )


def _chat_masked(tokenizer, example: Example, opts: Options) -> tuple[list[int], list[int]]:
    if opts.train_on_inputs:
        ids = tokenizer(_render(tokenizer, example.chat), add_special_tokens=False)["input_ids"]
        return ids, list(ids)
    turns = _trained_turns(example, opts)
    if "{% generation %}" in tokenizer.chat_template and all(example.chat[t]["role"] == "assistant" for t in turns):
        return _chat_with_markers(tokenizer, example, turns)
    return _chat_incremental(tokenizer, example, turns)


SYSTEM_PROBE = "lora_sft system probe 7f3a"  # a system message's text, looked for in what the template renders


def drops_system(tokenizer) -> bool:
    """Whether the chat template leaves a system message's text out of what it renders (some templates only
    render user and assistant turns); False when it renders it, or refuses system turns (each row says so)."""
    if not tokenizer.chat_template:
        return False
    chat = [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": "x"}]
    try:
        return SYSTEM_PROBE not in _render(tokenizer, chat + [{"role": "assistant", "content": "y"}])
    except Exception:  # a template that refuses system turns: the rows that have one are refused with the reason
        return False


def system_dropped(tokenizer, examples, shown: int = 5) -> dict | None:
    """The rows whose system message the chat template drops: {rows, first} (the first `shown` places), or None."""
    if not drops_system(tokenizer):
        return None
    places: list[str] = []
    n = 0
    for e in examples:
        if (
            e.text is None
            and e.messages
            and any(m["role"] == "system" and (m.get("content") or "").strip() for m in e.messages)
        ):
            n += 1
            places += [e.place][: shown - len(places)]
    return {"rows": n, "first": places} if n else None


def warnings(stats: dict) -> list[str]:
    """The data stage's warnings from a bundle's statistics (train and validate print them once): the rows whose
    system text the chat template drops."""
    dropped = stats.get("train", {}).get("system_dropped")
    if not dropped:
        return []
    more = f" and {dropped['rows'] - len(dropped['first'])} more" if dropped["rows"] > len(dropped["first"]) else ""
    return [
        f"warning: {dropped['template']} drops system messages: {dropped['rows']} train rows lose their system text "
        f"({', '.join(dropped['first'])}{more}); set data.chat_template (chatml, llama3 and mistral keep it) or move the text into the user turn"
    ]
