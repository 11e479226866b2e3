"""Exact label masks, written by hand.

The tokenizer here learns no merges, so every character is one token and a mask can be written as
the text with its trained characters in [[ ]]: the comparison pins the label of every token.
"""

from __future__ import annotations

import pytest
from helpers import build_tokenizer, write_jsonl

from lora_sft.cli.preview import marked
from lora_sft.data import CausalCollator, build
from lora_sft.data.templates import NAMED, apply
from lora_sft.errors import UserError
from lora_sft.recipe.load import load_recipe

pytestmark = pytest.mark.unit

LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MISTRAL = ["<s>", "</s>", "[INST]", "[/INST]"]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]
CHATML_BOTH_TURNS = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello<|im_end|>\n]]"
    "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[[Ciao<|im_end|>\n]]"
)


@pytest.fixture
def masks(tmp_path, write_recipe):
    """rows + data options (+ a tokenizer) -> the marked text of each sample."""

    def run(rows, tokenizer=None, task="causal_lm", source=None, samples=False, **data):
        tokenizer = tokenizer or build_tokenizer(["x"], vocab_size=0)
        data.setdefault("format", "messages")
        train = {"path": str(write_jsonl(tmp_path / "train.jsonl", rows)), **(source or {})}
        recipe = load_recipe(
            write_recipe(
                {
                    "task": task,
                    "output_dir": str(tmp_path / "run"),
                    "model": {"path": "unused"},
                    "data": {"train": train, "shuffle": False, "cache": False, **data},
                }
            )
        )
        apply(tokenizer, recipe.data.chat_template, "data.chat_template")
        bundle = build(recipe, tokenizer)
        if samples:
            return list(bundle.train)
        return [marked(tokenizer, s["input_ids"], s["labels"]) for s in bundle.train]

    return run


def test_multi_turn_with_system_template_without_generation_markers(masks):
    assert masks([{"messages": CHAT}]) == [CHATML_BOTH_TURNS]


def test_named_chatml_with_generation_markers_gives_the_same_mask(masks):
    assert masks([{"messages": CHAT}], chat_template="chatml") == [CHATML_BOTH_TURNS]


def test_last_turn_only_and_trained_roles(masks):
    assert masks([{"messages": CHAT}], train_turns="last") == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[[Ciao<|im_end|>\n]]"
    ]
    assert masks([{"messages": CHAT}], train_roles=["user"]) == [
        "<|im_start|>system\nBe brief.<|im_end|>\n[[<|im_start|>user\nHi<|im_end|>\n]]<|im_start|>assistant\nHello<|im_end|>\n"
        "[[<|im_start|>user\nBye<|im_end|>\n]]<|im_start|>assistant\nCiao<|im_end|>\n"
    ]


def test_sharegpt_conversations_map_roles(masks):
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Ciao"},
        ]
    }
    assert masks([row]) == [CHATML_BOTH_TURNS]


def test_llama3_template(masks):
    tok = build_tokenizer(
        ["x"], vocab_size=0, specials=LLAMA3, eos="<|eot_id|>", pad="<|eot_id|>", bos="<|begin_of_text|>", template=None
    )
    assert masks([{"messages": CHAT[:3]}], tokenizer=tok, chat_template="llama3") == [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[Hello<|eot_id|>]]"
    ]


def test_mistral_template_has_no_generation_prompt(masks):
    tok = build_tokenizer(["x"], vocab_size=0, specials=MISTRAL, eos="</s>", pad="</s>", bos="<s>", template=None)
    assert masks([{"messages": CHAT}], tokenizer=tok, chat_template="mistral") == [
        "<s>Be brief.\n\n[INST] Hi [/INST][[ Hello</s>]][INST] Bye [/INST][[ Ciao</s>]]"
    ]


def test_alpaca_through_the_chat_template_and_without_one(masks):
    rows = [{"instruction": "Name a fruit.", "input": "red", "output": "cherry", "system": "Be brief."}]
    assert masks(rows, format="alpaca") == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a fruit.\n\nred<|im_end|>\n<|im_start|>assistant\n[[cherry<|im_end|>\n]]"
    ]
    plain = build_tokenizer(["x"], vocab_size=0, template=None)
    assert masks([{"instruction": "Name a fruit.", "output": "apple"}], tokenizer=plain, format="alpaca") == [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a fruit.\n\n### Response:\n[[apple<|im_end|>]]"
    ]


def test_prompt_completion_strings_and_messages(masks):
    assert masks([{"prompt": "2+2=", "completion": "4"}], format="prompt_completion") == ["2+2=[[4<|im_end|>]]"]
    row = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}
    assert masks([row], format="prompt_completion") == [
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello<|im_end|>\n]]"
    ]


def test_column_mapping(masks):
    rows = [{"question": "2+2=", "answer": "4"}]
    assert masks(
        rows, format="prompt_completion", source={"columns": {"prompt": "question", "completion": "answer"}}
    ) == ["2+2=[[4<|im_end|>]]"]
    with pytest.raises(
        UserError,
        match=r"recipe\.yaml:9: data\.train\.columns\.output: no row of .*train\.jsonl has the column 'answer' \(its rows have: instruction, output\); fix the mapping$",
    ):
        masks([{"instruction": "x", "output": "y"}], format="alpaca", source={"columns": {"output": "answer"}})


def test_text_trains_everything_and_is_chunked(masks):
    assert masks([{"text": "abcdefghij"}], format="text", max_length=8) == ["[[abcdefgh]]", "[[ij<|im_end|>]]"]


def test_train_on_inputs(masks):
    assert masks([{"messages": CHAT[1:3]}], train_on_inputs=True) == [
        "[[<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n]]"
    ]


def test_tool_calls_are_carried_through_a_jinja_file_template(masks, tmp_path):
    template = tmp_path / "tools.jinja"
    template.write_text(
        "{% for m in messages %}<{{ m['role'] }}>"
        "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}call:{{ c['function']['name'] }}({{ c['function']['arguments'] }}){% endfor %}"
        "{% else %}{{ m['content'] }}{% endif %}</>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    row = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "wx", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "sun"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    assert masks([row], chat_template=str(template)) == [
        "<user>Weather?</><assistant>[[call:wx({})</>]]<tool>sun</><assistant>[[Sunny.</>]]"
    ]


def test_template_whose_prefixes_do_not_hold_is_refused_by_name(masks, tmp_path):
    template = tmp_path / "odd.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% if loop.last %}<end>{% endif %}{% endfor %}")
    with pytest.raises(
        UserError, match=r"train\.jsonl:1: chat template '.*odd\.jinja' renders earlier turns differently"
    ):
        masks([{"messages": CHAT}], chat_template=str(template))


def test_eos_is_trained_when_pad_equals_eos(masks):
    tok = build_tokenizer(["x"], vocab_size=0, pad="<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT[1:5]}]
    assert (
        masks(rows, tokenizer=tok)[0] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello<|im_end|>\n]]"
    )
    # after padding a batch: the short sample's trained EOS keeps its label, only the padding is -100
    short, long = masks(rows, tokenizer=tok, samples=True)
    batch = CausalCollator(tok.pad_token_id)([short, long])
    n = len(short["input_ids"])
    trained_eos = [
        j
        for j, (t, lab) in enumerate(zip(short["input_ids"], short["labels"]))
        if t == tok.eos_token_id and lab != -100
    ]
    assert len(trained_eos) == 1 and batch["labels"][0, trained_eos[0]] == tok.eos_token_id
    assert (
        (batch["input_ids"][0, n:] == tok.eos_token_id).all()
        and (batch["labels"][0, n:] == -100).all()
        and (batch["attention_mask"][0, n:] == 0).all()
    )


def test_template_is_saved_with_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(["x"], vocab_size=0, template=None)
    apply(tok, "chatml", "data.chat_template")
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == NAMED["chatml"]


ASSISTANT_FIRST = [
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Ciao"},
]


@pytest.mark.parametrize(
    "template", [None, "chatml"]
)  # the incremental path (no generation markers) and the marked one
def test_a_chat_that_starts_with_an_assistant_turn_does_not_train_the_header(masks, template):
    assert masks([{"messages": ASSISTANT_FIRST}], chat_template=template) == [
        "<|im_start|>assistant\n[[Hello<|im_end|>\n]]<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Ciao<|im_end|>\n]]"
    ]
    assert masks([{"messages": [{"role": "system", "content": "S"}, *ASSISTANT_FIRST]}], chat_template=template)[
        0
    ].startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\n[[Hello<|im_end|>\n]]<|im_start|>user\n")


def test_assistant_first_under_llama3_without_markers_keeps_bos_and_header_untrained(masks, tmp_path):
    template = tmp_path / "llama3.jinja"
    template.write_text(NAMED["llama3"].replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    tok = build_tokenizer(
        ["x"], vocab_size=0, specials=LLAMA3, eos="<|eot_id|>", pad="<|eot_id|>", bos="<|begin_of_text|>", template=None
    )
    assert masks([{"messages": ASSISTANT_FIRST[:1] + CHAT[1:3]}], tokenizer=tok, chat_template=str(template)) == [
        "<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n[[Hello<|eot_id|>]]"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[Hello<|eot_id|>]]"
    ]


def test_assistant_first_is_refused_when_the_template_has_no_generation_prompt(masks, tmp_path):
    template = tmp_path / "bare.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</>{% endfor %}")
    with pytest.raises(UserError) as err:
        masks([{"messages": CHAT[1:3]}, {"messages": ASSISTANT_FIRST}], chat_template=str(template))
    assert err.value.problems == [
        f"{tmp_path / 'train.jsonl'}:2: the chat starts with an assistant turn and chat template '{template}' does not show where that turn's header ends, "
        "so the header would be trained; start the chat with a user (or system) turn, or set data.chat_template (chatml, llama3, mistral)"
    ]


def test_rows_a_template_raises_on_are_all_reported_in_file_order(masks, tmp_path):
    template = tmp_path / "strict.jinja"
    template.write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}</>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    bad = {"messages": [CHAT[1], CHAT[1], CHAT[2]]}
    rows = [{"messages": CHAT[1:3]}] * 3 + [bad] + [{"messages": CHAT[1:5]}] * 20 + [bad] * 2
    with pytest.raises(UserError) as err:
        masks(rows, chat_template=str(template), shuffle=True, source={"weight": 2})
    line = f"chat template '{template}' cannot render this chat (TemplateError: Conversation roles must alternate user/assistant/user/assistant/...); fix the row or set data.chat_template"
    assert err.value.problems == [f"{tmp_path / 'train.jsonl'}:4, 25, 26: {line}"]  # one problem of three rows


def test_tool_calls_under_a_named_template_are_refused_with_the_reason(masks, tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "wx", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "sun"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    with pytest.raises(UserError) as err:
        masks([{"messages": CHAT}, row], chat_template="chatml")
    assert len(err.value.problems) == 1
    assert err.value.problems == [
        f"{tmp_path / 'train.jsonl'}:2: messages[1] has tool_calls, which chat template 'chatml' does not render (it writes a "
        "turn's role and content only, so the calls would be lost); use the model's own template if it renders tool calls, "
        "or a .jinja file that does (data.chat_template)"
    ]
    # with content as well, the calls would be dropped without a word: refused the same way
    row["messages"][1]["content"] = "Let me look."
    with pytest.raises(UserError) as err:
        masks([row], chat_template="chatml")
    assert err.value.problems[0].startswith(f"{tmp_path / 'train.jsonl'}:1: messages[1] has tool_calls, which chat")


def test_chat_rows_without_a_chat_template_say_it_once(masks, tmp_path):
    """A problem of the model, not of a row: 32 chat rows give one line (the rows counted), not 20 and '12 more'."""
    bare = build_tokenizer(["x"], vocab_size=0, template=None)
    with pytest.raises(UserError) as err:
        masks([{"messages": CHAT}] * 32, tokenizer=bare)
    [line] = err.value.problems
    assert line.startswith(
        f"{tmp_path / 'train.jsonl'}:1, 2, 3, 4, 5 and 27 more (32 rows): chat rows need a chat template"
    )


def test_a_template_that_drops_system_messages_is_said_once_naming_the_rows(tmp_path, write_recipe):
    from lora_sft.data.chats import warnings

    template = tmp_path / "no-system.jinja"  # renders user and assistant turns only, as some model templates do
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}<u>{{ m['content'] }}</u>"
        "{% elif m['role'] == 'assistant' %}<a>{% generation %}{{ m['content'] }}</>{% endgeneration %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    system = [{"role": "system", "content": "Be terse."}, *CHAT[1:3]]
    rows = [{"messages": system}, {"messages": CHAT[1:3]}] + [{"messages": system}] * 6

    def stats(chat_template):
        recipe = load_recipe(
            write_recipe(
                {
                    "task": "causal_lm",
                    "output_dir": str(tmp_path / "run"),
                    "model": {"path": "unused"},
                    "data": {
                        "format": "messages",
                        "train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
                        "shuffle": False,
                        "cache": False,
                        "chat_template": chat_template,
                    },
                }
            )
        )
        tokenizer = build_tokenizer(["x"], vocab_size=0)
        apply(tokenizer, recipe.data.chat_template, "data.chat_template")
        return build(recipe, tokenizer).stats

    path = tmp_path / "train.jsonl"
    assert warnings(stats(str(template))) == [
        f"warning: chat template '{template}' drops system messages: 7 train rows lose their system text "
        f"({', '.join(f'{path}:{n}' for n in (1, 3, 4, 5, 6))} and 2 more); set data.chat_template (chatml, llama3 and "
        "mistral keep it) or move the text into the user turn"
    ]
    assert warnings(stats("chatml")) == []  # chatml renders the system turn
