"""The base model's tokenizer, with the chat template and the special tokens the recipe adds, checked before any row
is rendered."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_sft.errors import UserError
from lora_sft.model.source import ModelSource, read_from
from lora_sft.recipe.schema import Recipe

if TYPE_CHECKING:
    from transformers import (
        PreTrainedTokenizerBase,
    )


def added_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of the special tokens `load_tokenizer` added to this tokenizer for its chat template."""
    return list(getattr(tokenizer, "lora_sft_added_ids", []))


def load_tokenizer(recipe: Recipe, source: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    m = recipe.model
    tokenizer = read_from(
        recipe,
        source,
        "tokenizer",
        lambda: AutoTokenizer.from_pretrained(source.path, revision=m.revision, trust_remote_code=m.trust_remote_code),
    )
    from lora_sft.data import templates

    templates.apply(tokenizer, recipe.data.chat_template, recipe.where("data", "chat_template"))
    if source.gguf is not None and not tokenizer.chat_template and "messages" in recipe.data.formats():
        raise UserError(
            f"{recipe.where('model', 'path')}: {source.gguf.name} has no chat template (its metadata has no tokenizer.chat_template) and data.format messages renders every chat with one; set data.chat_template (chatml, llama3, mistral or a .jinja file)"
        )
    _check_template_syntax(recipe, tokenizer)
    if recipe.task == "causal_lm":
        _add_special_tokens(recipe, tokenizer)
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and loss, so reusing EOS is safe: EOS in the text keeps its label.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def is_one_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    return token in tokenizer.get_vocab() and len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def _add_special_tokens(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> None:
    """data.add_special_tokens: the chat template's markers that are not single tokens become special tokens
    (auto), or the run is refused (false); a list adds exactly those, and must name every such marker. A marker split into ordinary tokens
    would be learned as spelling, and generation could never stop on one end-of-turn token. The ids added
    are kept on the tokenizer (`added_token_ids`), and the template's end-of-turn marker becomes EOS."""
    from lora_sft.data import templates

    spec, name = recipe.data.add_special_tokens, recipe.data.chat_template
    missing = [m for m in templates.markers(name) if not is_one_token(tokenizer, m)]
    if spec is False:
        if missing:
            raise UserError(
                f"{recipe.where('data', 'add_special_tokens')}: chat template {name!r} writes {', '.join(missing)}, which the tokenizer of {recipe.model.path} splits into ordinary tokens (the model would learn to spell them and never stop on one end-of-turn token); set data.add_special_tokens: auto to add them as trained special tokens"
            )
        return
    left = [m for m in missing if isinstance(spec, list) and m not in spec]
    if left:  # a list that leaves a marker of the template split, as `false` would
        raise UserError(
            f"{recipe.where('data', 'add_special_tokens')}: the list leaves {', '.join(left)} (written by chat template {name!r}) split into ordinary tokens by the tokenizer of {recipe.model.path} (the model would learn to spell {'it' if len(left) == 1 else 'them'}); add {'it' if len(left) == 1 else 'them'} to the list, or set data.add_special_tokens: auto"
        )
    wanted = missing if spec is True or spec == "auto" else [t for t in spec if not is_one_token(tokenizer, t)]
    if not wanted:
        return
    before = len(tokenizer)
    tokenizer.add_tokens(wanted, special_tokens=True)
    tokenizer.lora_sft_added_ids = list(range(before, len(tokenizer)))
    eot = templates.end_of_turn(name)
    if eot in wanted:
        tokenizer.eos_token = eot  # the turn ends, and generation stops, on the template's marker


def _check_template_syntax(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> None:
    """A chat template that does not compile fails on every row: say so once, naming where it came from."""
    from jinja2 import TemplateError, TemplateSyntaxError

    if not tokenizer.chat_template:
        return
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)  # compiles the template
    except TemplateSyntaxError as e:
        where = (
            recipe.where("data", "chat_template")
            if recipe.data.chat_template
            else f"{recipe.where('model', 'path')}: the tokenizer's chat template"
        )
        raise UserError(f"{where}: template syntax error at line {e.lineno}: {e.message}") from None
    except TemplateError:
        pass  # the template refuses this one-message chat: rows are rendered (and checked) one by one later
