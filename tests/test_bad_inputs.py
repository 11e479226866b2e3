"""The bad-input corpus: every file in tests/bad_inputs/*.yaml is a recipe with one mistake in it
(in the recipe, its overrides, its data file or its model folder) and ends with

    # expect: the part of the one error line that names the place and the problem
    # args: extra command-line arguments (optional)

Placeholders: {out} the output_dir, {model} a tiny Llama folder, {examples} data/examples,
{data} tests/bad_inputs/data, {here} tests/bad_inputs, {recipe} the recipe's path.

`train` must exit 2 with exactly one line, `error: ...` containing the expected text, no
traceback, and leave everything as it was: output_dir (which holds a file of the user's) and the
folder around it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from conftest import REPO

from lora_sft.cli import main

pytestmark = pytest.mark.unit
HERE = REPO / "tests" / "bad_inputs"
CASES = sorted(HERE.glob("*.yaml"))
NEEDS_CPU = {"paged-optimizer-on-cpu"}  # fine on a GPU machine


def test_corpus_size():
    assert len(CASES) >= 40


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_bad_input(case, tiny_llama, tmp_path, monkeypatch, capsys):
    if case.stem in NEEDS_CPU and torch.cuda.is_available():
        pytest.skip("a CPU-only refusal")
    text = case.read_text()
    meta = dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith(("# expect: ", "# args: ")))
    recipe = tmp_path / "recipe.yaml"
    places = {"{out}": str(tmp_path / "out"), "{model}": str(tiny_llama), "{examples}": str(REPO / "data" / "examples"),
              "{data}": str(HERE / "data"), "{here}": str(HERE), "{recipe}": str(recipe)}

    def fill(s: str) -> str:
        for key, value in places.items():
            s = s.replace(key, value)
        return s

    recipe.write_text(fill(text))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    monkeypatch.setenv("LORA_SFT_REMOTE_CODE_MARKER", str(tmp_path / "remote-code-ran"))
    monkeypatch.chdir(tmp_path)
    before, corpus_before = _snapshot(tmp_path), _snapshot(HERE)

    code = main(["train", str(recipe), *shlex.split(fill(meta.get("args", "")))])

    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fill(meta["expect"]) in lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(tmp_path) == before
    assert _snapshot(HERE) == corpus_before
