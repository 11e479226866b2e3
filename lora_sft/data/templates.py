"""Chat templates by name, for base models whose tokenizer has none (or to replace the one it has).

The named templates mark assistant turns with {% generation %} so the trained tokens are known
exactly; the template used is set on the tokenizer, which the run saves with the adapter, so
inference renders what training saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

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
