"""GGUF export: a tiny trained Llama and a tiny Qwen2 converted and loaded with llama.cpp (llama-cpp-python),
logits compared with the merged transformers model; the Modelfile per template family; the refusals.

The llama.cpp tests carry the marker `gguf` (left out of a plain run; `.ci/run` installs the gguf extra and runs
`pytest -m gguf`); the others run everywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CHATML, REPO, TINY_DIMS, build_tokenizer, hub_env

from lora_sft.cli.main import main
from lora_sft.data.templates import NAMED
from lora_sft.errors import RunError, UserError
from lora_sft.export import gguf as gguf_export
from lora_sft.export import gguf_write

CORPUS = (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()
CHAT = [{"role": "user", "content": "Count the words.\n\npillow silver"}, {"role": "assistant", "content": "2"}]
QWEN2_REGEX = next(regex for regex, name in gguf_write.PRE_TOKENIZERS.items() if name == "qwen2")


def fit(model, tokenizer, steps: int = 30):
    """A few steps on the example texts, so the model's next token is clear: 16 greedy steps of a random model meet
    near-ties that any rounding (f16 weights, llama.cpp's f16 KV cache) flips, which says nothing of the conversion."""
    import torch

    texts = [*CORPUS[:16], *(tokenizer.apply_chat_template([m], tokenize=False) for m in CHAT)]
    rows = [ids[:64] for ids in tokenizer(texts)["input_ids"]]
    ids = torch.tensor([row + [0] * (64 - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (64 - len(row)) for row in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def save_tiny_qwen2(path: Path) -> tuple[Path, object]:
    """A 2-layer random Qwen2 (q/k/v biases, tied embeddings, embedding rows padded past the tokenizer) with a
    Qwen2-style BPE tokenizer (its split regex) and a chatml template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(CORPUS, split_regex=QWEN2_REGEX)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer) + 16,  # rows the tokenizer never produces, as Qwen2 pads its vocabulary
        **TINY_DIMS,
        tie_word_embeddings=True,
        initializer_range=0.05,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fit(Qwen2ForCausalLM(config), tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def build_spm_tokenizer():
    """A SentencePiece-style (Llama 2 / Mistral) tokenizer as transformers saves one: BPE with byte fallback, "▁" for
    spaces, <unk> <s> </s> then the 256 byte pieces, then the learned pieces; it adds <s>; a mistral chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def spm_model(**kwargs):
        tok = Tokenizer(models.BPE(unk_token="<unk>", **kwargs))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        return tok

    learner = spm_model()
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    learned = json.loads(learner.to_str())["model"]
    fixed = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]) if t != "<unk>"]
    vocab = {t: i for i, t in enumerate(fixed + pieces)}
    tok = spm_model(vocab=vocab, merges=[tuple(m) for m in learned["merges"]], byte_fallback=True, fuse_unk=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=NAMED["mistral"]
    )


def save_tiny_mistral(path: Path) -> tuple[Path, object]:
    """A 2-layer random Mistral (GQA, head_dim set apart from hidden / heads) with a SentencePiece-style tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = build_spm_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        **TINY_DIMS,
        head_dim=32,
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=2,
    )
    fit(MistralForCausalLM(config), tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def prompts(tokenizer) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=True, return_dict=False),
        tokenizer("Below is an instruction that describes a task.")["input_ids"],
    ]


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


# ---------------------------------------------------------------- llama.cpp round trips (marker gguf)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """`export --gguf` (f16) of the tiny trained Llama, as a user runs it."""
    run_dir, hub, _ = tiny_run
    out = tmp_path_factory.mktemp("gguf-export") / "export"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(run_dir), "--gguf", "--samples", "4", "--out", str(out)]) == 0
    return run_dir, out, hub, printed.getvalue()


@pytest.mark.gguf
def test_trained_llama_f16_gguf_gives_the_merged_models_logits_in_llama_cpp(exported):
    _, out, _, printed = exported
    report = json.loads((out / "fidelity.json").read_text())
    entry = report["gguf"]["conversion"]  # the f16 file against the merged folder (the serving check: test_real_model)
    assert entry["checked"] and entry["passed"] and report["passed"], report["problems"]
    assert entry["file"] == "run-f16.gguf" and (out / "gguf" / "run-f16.gguf").is_file()
    assert entry["prompts"] == 4 and entry["positions"] > 4 * 8
    assert entry["max_abs_logit_diff"] <= 1e-2 * entry["max_abs_logit"]
    # 16 greedy tokens each, token for token; a path may part only where transformers has the two tokens within the
    # f16 tolerance of each other (a near-tie that llama.cpp's f16 KV cache may flip, as a build for another CPU did)
    assert entry["greedy_identical_prompts"] + entry["greedy_ties"] == 4, entry["greedy"]
    for g in entry["greedy"]:
        assert len(g["llama_cpp"]) == 16
        if g["transformers"] != g["llama_cpp"]:
            part = g["parted_at"]
            assert g["transformers"][:part] == g["llama_cpp"][:part]
            assert g["logit_gap"] <= 1e-2 * entry["max_abs_logit"]
    assert entry["tokenizer_identical_prompts"] == 4
    assert (out / "merged" / "config.json").is_file()  # --gguf implies --merged
    types = tensor_types(out / "gguf" / "run-f16.gguf")
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "gguf run-f16.gguf loaded with llama.cpp vs merged" in printed
    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert "FROM ./run-f16.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    for card in (out / "adapter" / "README.md", out / "merged" / "README.md"):
        text = card.read_text()
        assert "llama-cli -m gguf/run-f16.gguf -cnv" in text, card
        assert "ollama create run-f16 -f Modelfile && ollama run run-f16" in text, card


@pytest.mark.gguf
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "bf16"])
def test_trained_llama_ggufs_of_each_type_agree_with_the_merged_model(exported, gguf_type, tmp_path):
    _, out, _, _ = exported
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    # ~200 positions: the tiny Llama (initializer 0.3) amplifies rounding layer by layer, so its agreement is ~0.93
    instructions = [tokenizer(json.loads(row)["instruction"])["input_ids"] for row in CORPUS[:8]]
    entry = gguf_export.export_gguf(out / "merged", tmp_path, "tiny", gguf_type, prompts(tokenizer) + instructions)
    assert entry["checked"] and entry["passed"], entry["problems"]
    assert entry["greedy_agreement"] >= 0.9
    assert tensor_types(tmp_path / f"tiny-{gguf_type}.gguf")["blk.1.ffn_down.weight"] == gguf_type.upper()
    if gguf_type == "f16":  # greedy paths may part only where transformers has two tokens within the tolerance
        assert entry["greedy_identical_prompts"] + entry["greedy_ties"] == entry["prompts"] == 10
        tolerance = 1e-2 * entry["max_abs_logit"]
        assert all(g["logit_gap"] <= tolerance for g in entry["greedy"] if "parted_at" in g)


@pytest.mark.gguf
def test_push_uploads_the_gguf_and_modelfile_with_the_export(exported, tmp_path):
    _, out, hub, _ = exported
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "push", str(out), "--repo-id", "me/tiny-gguf"],
        env=hub_env(hub.url, tmp_path / "hf-home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pushed = hub.files[("me/tiny-gguf", "main")]
    for name in ("gguf/run-f16.gguf", "gguf/Modelfile", "merged/README.md", "fidelity.json"):
        assert pushed[name] == (out / name).read_bytes(), name


@pytest.mark.gguf
def test_a_gguf_that_fails_its_serving_check_is_kept_marked_and_never_pushed(exported, tmp_path, capsys):
    """A budget the file cannot meet (--max-drift 1e-12: the f16 file's rounding alone is above it) fails the serving
    check: exit 2 in one line, the files kept for inspection and marked failed, and push refuses the folder."""
    run_dir, _, hub, _ = exported
    out = tmp_path / "failed"
    assert main(["export", str(run_dir), "--gguf-type", "f16", "--max-drift", "1e-12", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the GGUF export failed its serving check: f16: mean KL "), err
    assert f"the files are kept for inspection in {out / 'gguf'}, marked failed" in err[0]
    assert (out / "gguf" / "run-f16.gguf").is_file() and (out / "gguf" / "Modelfile").is_file()
    assert "is above --max-drift 1e-12" in (out / "gguf" / "PARITY-FAILED.txt").read_text()
    report = json.loads((out / "fidelity.json").read_text())
    assert report["passed"] is False and not report["gguf"]["files"][0]["passed"]
    assert "| run-f16.gguf | FAILED |" in (out / "merged" / "README.md").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "push", str(out), "--repo-id", "me/failed"],
        env=hub_env(hub.url, tmp_path / "hf-home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "this export failed its checks" in proc.stderr, proc.stderr
    assert ("me/failed", "main") not in hub.files


@pytest.mark.gguf
def test_a_second_gguf_export_replaces_its_files_and_keeps_the_users(exported, tmp_path):
    """export --gguf over an earlier one: the earlier .gguf of another type goes, a file of the user's in gguf/ and
    next to the export stays (the ownership rule, run/files.py)."""
    import shutil

    run_dir, first, _, _ = exported
    out = tmp_path / "export"
    shutil.copytree(first, out, symlinks=True)
    (out / "gguf" / "Modelfile.mine").write_text("FROM ./run-f16.gguf\nPARAMETER temperature 0\n")
    (out / "serve.sh").write_text("ollama create mine -f gguf/Modelfile.mine\n")
    assert main(["export", str(run_dir), "--gguf-type", "q8_0", "--samples", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["Modelfile", "Modelfile.mine", "run-q8_0.gguf"]
    assert (out / "serve.sh").is_file() and "PARAMETER temperature 0" in (out / "gguf" / "Modelfile.mine").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        ".lora_sft-export",
        "adapter",
        "fidelity.json",
        "gguf",
        "merged",
        "serve.sh",
    ]


@pytest.mark.gguf
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "bf16"])
def test_tiny_qwen2_gguf_round_trip(gguf_type, tmp_path):
    merged, tokenizer = save_tiny_qwen2(tmp_path / "qwen2")
    entry = gguf_export.export_gguf(merged, tmp_path / "gguf", "qwen2", gguf_type, prompts(tokenizer))
    assert entry["checked"] and entry["passed"], entry["problems"]
    assert entry["tokenizer_identical_prompts"] == 2
    if gguf_type == "f16":
        assert entry["max_abs_logit_diff"] <= 1e-2 * entry["max_abs_logit"]
        # identical for 16 steps, or parted only where transformers' own two best tokens are within the f16
        # tolerance (a near-tie of the tiny model: a clean-clone CI build of llama.cpp parted one prompt there)
        assert entry["greedy_identical_prompts"] + entry["greedy_ties"] == 2, entry
    assert entry["greedy_agreement"] >= 0.9
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "gguf" / f"qwen2-{gguf_type}.gguf"))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tokenizer) + 16
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    assert "blk.0.attn_q.bias" in tensor_types(tmp_path / "gguf" / f"qwen2-{gguf_type}.gguf")


@pytest.mark.gguf
def test_tiny_mistral_gguf_round_trip_with_a_sentencepiece_vocabulary(tmp_path):
    merged, tokenizer = save_tiny_mistral(tmp_path / "mistral")
    entry = gguf_export.export_gguf(merged, tmp_path / "gguf", "mistral", "f16", prompts(tokenizer))
    assert entry["checked"] and entry["passed"], entry["problems"]
    assert entry["max_abs_logit_diff"] <= 1e-2 * entry["max_abs_logit"]
    assert entry["greedy_identical_prompts"] == entry["tokenizer_identical_prompts"] == 2
    assert "[INST] {{ .Content }} [/INST]" in (tmp_path / "gguf" / "Modelfile").read_text()


# ---------------------------------------------------------------- without llama.cpp


@pytest.mark.e2e
def test_gguf_refuses_an_unsupported_architecture_before_writing(tiny_run, tmp_path, capsys, monkeypatch):
    run_dir, _, _ = tiny_run
    # as if llama were not supported
    monkeypatch.setattr(gguf_write, "ARCHITECTURES", {"qwen2": gguf_write.ARCHITECTURES["qwen2"]})
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--gguf-type", "q8_0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --gguf: architecture 'llama' is not supported; GGUF export supports qwen2"
    )
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.unit
def test_gguf_refuses_other_architectures_and_classifiers_in_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        gguf_write.check_supported("gpt_neox", "causal_lm")
    assert e.value.problems == [
        "--gguf: architecture 'gpt_neox' is not supported; GGUF export supports gemma2, llama, mistral, phi3, qwen2, qwen3"
    ]
    with pytest.raises(UserError) as e:
        gguf_write.check_supported("llama", "classification")
    assert e.value.problems == [
        "--gguf: a classification run has a classification head; llama.cpp runs causal LMs only"
    ]
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(UserError):
        gguf_write.write(tmp_path / "merged", tmp_path / "gguf", "x", "f16")
    assert not (tmp_path / "gguf").exists()


LLAMA3_MODELFILE = '''# Ollama: ollama create NAME -f Modelfile && ollama run NAME
FROM ./m-q8_0.gguf

# the llama3 chat template, as the model was trained with
TEMPLATE """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

PARAMETER stop "<|eot_id|>"
PARAMETER stop "<|start_header_id|>"
'''


@pytest.mark.unit
def test_modelfile_for_each_template_family():
    assert gguf_export.modelfile("m-q8_0.gguf", NAMED["llama3"], "<|eot_id|>") == LLAMA3_MODELFILE
    chatml = gguf_export.modelfile("m-f16.gguf", CHATML, "<|endoftext|>")
    assert (
        '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        in chatml
    )
    assert chatml.count('"""') == 2 and '<|im_start|>assistant\n"""' in chatml
    stops = [line for line in chatml.splitlines() if line.startswith("PARAMETER stop")]
    assert stops == [
        'PARAMETER stop "<|endoftext|>"',
        'PARAMETER stop "<|im_end|>"',
        'PARAMETER stop "<|im_start|>"',
    ]
    mistral = gguf_export.modelfile("m-f16.gguf", NAMED["mistral"], "</s>")
    assert '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]' in mistral
    assert '{{- else if eq .Role "assistant" }} {{ .Content }}</s>{{- end }}' in mistral
    assert [line for line in mistral.splitlines() if line.startswith("PARAMETER")] == [
        'PARAMETER stop "</s>"',
        'PARAMETER stop "[INST]"',
    ]
    other = gguf_export.modelfile("m-f16.gguf", "{{ messages[0]['content'] }}", "<eos>")
    assert "TEMPLATE" not in other.replace("no TEMPLATE", "")
    assert "Ollama renders chats\n# with the template embedded in the GGUF (tokenizer.chat_template)" in other
    assert other.splitlines()[1] == "FROM ./m-f16.gguf" and other.endswith('PARAMETER stop "<eos>"\n')


@pytest.mark.unit
def test_vocabulary_types_and_pre_tokenizer(tmp_path):
    import gguf
    from tokenizers import pre_tokenizers

    build_tokenizer(CORPUS[:20]).save_pretrained(tmp_path / "gpt2")
    vocab = gguf_write.vocabulary(tmp_path / "gpt2", 420)
    assert (vocab.model, vocab.pre) == ("gpt2", "gpt-2")
    assert vocab.tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert vocab.types[:3] == [gguf.TokenType.CONTROL] * 3 and vocab.types[3] == gguf.TokenType.NORMAL
    assert vocab.tokens[400:] == [f"[PAD{i}]" for i in range(400, 420)]
    assert set(vocab.types[400:]) == {gguf.TokenType.UNUSED}
    build_tokenizer(CORPUS[:20], split_regex=QWEN2_REGEX).save_pretrained(tmp_path / "qwen2")
    assert gguf_write.vocabulary(tmp_path / "qwen2", 400).pre == "qwen2"
    smollm = build_tokenizer(CORPUS[:20])
    smollm.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    smollm.save_pretrained(tmp_path / "smollm")
    assert gguf_write.vocabulary(tmp_path / "smollm", 400).pre == "smollm"
    tokenizer = build_spm_tokenizer()
    tokenizer.save_pretrained(tmp_path / "spm")
    vocab = gguf_write.vocabulary(tmp_path / "spm", len(tokenizer))
    assert (vocab.model, vocab.pre) == ("llama", None)
    assert vocab.types[:4] == [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.BYTE,
    ]
    assert vocab.tokens[3] == "<0x00>" and vocab.types[258] == gguf.TokenType.BYTE
    assert vocab.types[259] == gguf.TokenType.NORMAL and vocab.scores[259] > vocab.scores[260]
    with pytest.raises(RunError, match="embedding rows"):
        gguf_write.vocabulary(tmp_path / "gpt2", 100)


@pytest.mark.unit
def test_llama3_rope_scaling_becomes_llama_cpps_rope_freqs_and_other_scalings_are_refused(tmp_path):
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    tokenizer = build_tokenizer(CORPUS[:20])
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=len(tokenizer), **TINY_DIMS)
    config.rope_parameters = rope
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama3")
    tokenizer.save_pretrained(tmp_path / "llama3")
    path = gguf_write.write(tmp_path / "llama3", tmp_path / "gguf", "llama3", "f16")
    reader = gguf.GGUFReader(str(path))
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(freqs, plain / scaled.numpy(), rtol=1e-5)  # what llama.cpp divides each by
    assert reader.fields["llama.rope.freq_base"].contents() == 500000.0
    with pytest.raises(UserError) as e:
        gguf_write.check_ready(config.to_dict() | {"rope_parameters": {"rope_type": "dynamic"}}, "causal_lm")
    assert e.value.problems == [
        "--gguf: rope scaling 'dynamic' has no llama.cpp equivalent here (default, linear, yarn, llama3; longrope on phi3)"
    ]


@pytest.mark.gguf
def test_a_gguf_llama_cpp_cannot_load_fails_the_check_with_the_reason(tmp_path):
    merged, tokenizer = save_tiny_qwen2(tmp_path / "qwen2")
    bad = tmp_path / "bad-f16.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))  # a header and nothing else
    entry = gguf_export.check(bad, merged, "f16", prompts(tokenizer))
    assert entry["checked"] and not entry["passed"]
    assert entry["problems"][0].startswith("llama.cpp (llama-cpp-python) failed running bad-f16.gguf (exit 1: "), entry


@pytest.mark.unit
def test_without_llama_cpp_the_gguf_entry_says_it_was_not_checked_and_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a)
    )
    entry = gguf_export.check(tmp_path / "m-f16.gguf", tmp_path, "f16", [[1, 2]])
    assert entry == {
        "checked": False,
        "why": "llama-cpp-python is not installed, so the GGUF was not loaded; pip install 'lora-sft[gguf]' and export again to check it",
    }
    card = gguf_export.card_section(
        {
            "conversion": entry | {"file": "m-f16.gguf", "size_mb": 1.5},
            "files": [{"type": "f16", "file": "m-f16.gguf", "size_mb": 1.5, "modelfile": "Modelfile"}],
        }
    )
    assert (
        "llama-cli -m gguf/m-f16.gguf -cnv\ncd gguf && ollama create m-f16 -f Modelfile && ollama run m-f16\n" in card
    )
    assert card.endswith(f"Not load-checked: {entry['why']}.\n")
