"""Chat templates by name, for base models whose tokenizer has none (or to replace the one it has).

The named templates mark assistant turns with {% generation %} so the trained tokens are known
exactly; the template used is set on the tokenizer, which the run saves with the adapter, so
inference renders what training saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lora_sft.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NAMED = {
    "chatml": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}"
    ),
}

# The markers each named template writes that must be single special tokens (a base tokenizer without
# them would split each into several ordinary tokens), and the one that ends a turn (its EOS). mistral's
# [INST] markers are plain text in its own tokenizer and it ends a turn with the tokenizer's eos_token.
MARKERS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": [],
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def markers(name: str | None) -> list[str]:
    """The special-token markers of a named template; none known for a .jinja file or the tokenizer's own."""
    return list(MARKERS.get(name or "", []))


def end_of_turn(name: str | None) -> str | None:
    return END_OF_TURN.get(name or "")


def apply(tokenizer: PreTrainedTokenizerBase, name: str | None, where: str) -> None:
    """Set the recipe's chat template on the tokenizer (a name or a .jinja file); None keeps its own."""
    if name is None:
        return
    if name in NAMED:
        tokenizer.chat_template = NAMED[name]
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(
                f"{where}: {name!r} is neither a named template ({', '.join(NAMED)}) nor a .jinja file that exists"
            )
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: cannot read {path} ({e})") from None
    tokenizer.chat_template_name = f"chat template {name!r}"
