"""The serving check's verdict (gguf_serving.verdict) on what llama.cpp served, the Ollama prompt it compares, and
the --gguf-type refusals. The check run for real, on SmolLM2 in llama.cpp, is in tests/test_real_model.py."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
from helpers import REPO, build_tokenizer

from lora_sft.errors import UserError
from lora_sft.export import gguf as gguf_export
from lora_sft.export import serving as gguf_serving

CORPUS = [
    line for f in ("alpaca.jsonl", "chat.jsonl") for line in (REPO / "data/examples" / f).read_text().splitlines()
]
CHAT = [{"role": "user", "content": "Name the capital of France."}]
DRIFT = {"mean_kl": 0.02, "perplexity_change": 0.1, "greedy_agreement": 0.97, "max_abs_logit_diff": 1.5}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS)


def case(tokenizer, served_ids=None, eog=True, text="Paris.", finish="stop", ollama_ids=None):
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    p = gguf_serving.Prompts(
        chats=[CHAT],
        texts=[prompt],
        trained_ids=[ids],
        references=["Paris."],
        generated=["Paris."],
        stopped=[True],
        trained_metrics={"exact_match": 1.0},
        ollama=[prompt],
        max_new_tokens=8,
        end_of_turn=[end],
    )
    one = {"prompt_ids": ids if served_ids is None else served_ids, "text": text, "finish_reason": finish}
    one["ollama_ids"] = ids if ollama_ids is None else ollama_ids
    served = {"llama_cpp_python": "0.3.36", "chat_format": "chat_template.default", "served": [one]}
    served["eog"] = {str(end): eog}
    run = SimpleNamespace(tokenizer=tokenizer, recipe=SimpleNamespace(eval=SimpleNamespace(metrics=["exact_match"])))
    return run, p, served, ids


@pytest.mark.unit
def test_a_served_chat_that_matches_training_passes(tokenizer):
    run, p, served, _ = case(tokenizer)
    v = gguf_serving.verdict(run, "q8_0", p, served, DRIFT, max_drift=None)
    assert v["passed"] and v["problems"] == []
    assert (v["template_identical"], v["ollama_template_identical"], v["generation_identical"]) == (1, 1, 1)
    assert v["metrics"] == {"exact_match": 1.0} and v["end_of_turn"] == {"<|im_end|>": True}


@pytest.mark.unit
def test_a_prompt_mismatch_names_the_first_differing_token(tokenizer):
    run, p, served, ids = case(tokenizer)
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    served["served"][0]["prompt_ids"] = [bos, *ids]  # a BOS the training never had (a template that adds its own)
    v = gguf_serving.verdict(run, "q4_k_m", p, served, DRIFT, max_drift=None)
    assert not v["passed"] and len(v["problems"]) == 1
    assert v["problems"][0].startswith(
        "q4_k_m: the prompt llama.cpp builds with the GGUF's chat template differs from the trained one on 1 of 1 prompts (first: prompt 0, token 0: trained '<|im_start|>' (id 1), served '<|endoftext|>' (id 0))"
    ), v["problems"]


@pytest.mark.unit
def test_an_end_of_turn_that_is_not_a_stop_token_and_a_run_on_fail(tokenizer):
    run, p, served, _ = case(tokenizer, eog=False, text="Paris.\nuser\nAnd Spain?", finish="length")
    v = gguf_serving.verdict(run, "f16", p, served, DRIFT, max_drift=None)
    assert not v["passed"]
    assert any("'<|im_end|>') is not an end-of-generation token of the GGUF" in x for x in v["problems"])
    assert any("wrote the trained model's response and did not stop there" in x for x in v["problems"])
    assert v["stopped"] == 0 and v["trained_stopped"] == 1


@pytest.mark.unit
def test_the_ollama_prompt_and_the_drift_budget_are_checked(tokenizer):
    run, p, served, _ = case(tokenizer, ollama_ids=[])
    v = gguf_serving.verdict(run, "q4_k_m", p, served, DRIFT, max_drift=0.01)
    assert [x.split(":")[0] for x in v["problems"]] == ["q4_k_m", "q4_k_m"]
    assert "the prompt the Modelfile's TEMPLATE builds differs" in v["problems"][0]
    assert "served end of prompt" in v["problems"][0]
    assert v["problems"][1] == "q4_k_m: mean KL 0.02 to the model as trained is above --max-drift 0.01"


@pytest.mark.unit
def test_the_ollama_prompt_renders_as_the_chat_template_with_its_default_system_prompt(tokenizer):
    system = "You are a helpful assistant."
    tokenizer = build_tokenizer(CORPUS)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system + "<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert gguf_export.default_system(tokenizer) == system
    for chat in (CHAT, [{"role": "system", "content": "Be terse."}, *CHAT]):
        want = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert gguf_export.ollama_prompt("chatml", system, chat) == want
    modelfile = gguf_export.modelfile("m-q4_k_m.gguf", tokenizer.chat_template, "<|im_end|>", system)
    assert f'SYSTEM """{system}"""' in modelfile and 'TEMPLATE """{{- if .System }}' in modelfile
    plain = build_tokenizer(CORPUS)  # a chatml template with no default system prompt: no SYSTEM line
    assert gguf_export.default_system(plain) is None


@pytest.mark.unit
def test_gguf_types_are_checked_before_anything_is_loaded(monkeypatch):
    assert gguf_export.parse_types("q8_0, q4_k_m,q8_0", None) == ["q8_0", "q4_k_m"]
    with pytest.raises(UserError, match=r"^--gguf-type: q3_k is not a GGUF type; give one or more of f16, bf16"):
        gguf_export.parse_types("q8_0,q3_k", None)
    with pytest.raises(UserError, match=r"^--gguf-type auto: .* give it with --max-drift X"):
        gguf_export.parse_types("auto", None)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a)
    )
    gguf_export.check_quantizer(["f16", "bf16"])  # written by lora_sft's converter: no llama.cpp needed
    with pytest.raises(UserError) as e:
        gguf_export.check_quantizer(["f16", "q4_k_m"])
    assert str(e.value) == (
        "--gguf-type q4_k_m: quantizing uses llama.cpp's own quantizer from llama-cpp-python, which is not installed; "
        "pip install 'lora-sft[gguf]' (f16 and bf16 need only gguf)"
    )
