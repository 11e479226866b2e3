"""The bad-input corpus: every file in tests/bad_inputs/*.yaml is a recipe with a mistake in it (in the
recipe, its overrides, its data file, its model folder, or the command line) and ends with comments:

    # expect: text that the error line contains (one `# expect:` per expected line, in order)
    # args: extra command-line arguments (optional)
    # command: the command to run (default `train`; also validate, preview, export, eval, generate, push)
    # validate: skip  (only for cases whose mistake is a flag that validate does not take)

Placeholders: {out} the output_dir (it does not exist beforehand), {model} a tiny Llama folder,
{examples} data/examples, {data} tests/bad_inputs/data, {here} tests/bad_inputs, {recipe} the
recipe's path, {tmp} the test's folder, {run} a finished tiny run copied into the test's folder.

A case with the default command runs twice: `train` and `validate` must both refuse it the same way
(validate checks what train checks). Each run must exit 2 with exactly the expected error lines, each
`error: ...`, no traceback, and leave everything as it was: the test's folder (with a file of the
user's in it, the recipe, the copied run) and the corpus itself, compared byte for byte.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO

from lora_sft.cli.main import main

pytestmark = pytest.mark.unit
HERE = REPO / "tests" / "bad_inputs"
CASES = sorted(HERE.glob("*.yaml"))
NEEDS_CPU = {"paged-optimizer-on-cpu"}  # fine on a GPU machine


def _meta(text: str) -> dict[str, list[str]]:
    meta: dict[str, list[str]] = {}
    for line in text.splitlines():
        for key in ("expect", "args", "command", "validate"):
            if line.startswith(f"# {key}: "):
                meta.setdefault(key, []).append(line.split(": ", 1)[1])
    return meta


def _runs() -> list:
    out = []
    for case in CASES:
        meta = _meta(case.read_text())
        command = meta.get("command", ["train"])[0]
        out.append(pytest.param(case, command, id=f"{command}-{case.stem}"))
        if command == "train" and meta.get("validate") != ["skip"]:
            out.append(pytest.param(case, "validate", id=f"validate-{case.stem}"))
    return out


def test_corpus_size():
    assert len(CASES) >= 150


def test_every_case_expects_something():
    for case in CASES:
        assert _meta(case.read_text()).get("expect"), f"{case.name} has no `# expect:` line"


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def finished_run(request, tmp_path):
    """A copy of the shared tiny run, for cases that work on a finished run ({run})."""
    source, _, _ = request.getfixturevalue("tiny_run")
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("case,command", _runs())
def test_bad_input(case, command, tiny_llama, tmp_path, monkeypatch, capsys, request):
    if case.stem in NEEDS_CPU and torch.cuda.is_available():
        pytest.skip("a CPU-only refusal")
    text = case.read_text()
    meta = _meta(text)
    work = tmp_path / "work"
    work.mkdir()
    recipe = work / "recipe.yaml"
    places = {
        "{out}": str(work / "out"),
        "{model}": str(tiny_llama),
        "{examples}": str(REPO / "data" / "examples"),
        "{data}": str(HERE / "data"),
        "{here}": str(HERE),
        "{recipe}": str(recipe),
        "{tmp}": str(work),
    }
    if "{run}" in text:
        run = work / "run"
        shutil.copytree(request.getfixturevalue("tiny_run")[0], run)
        places["{run}"] = str(run)

    def fill(s: str) -> str:
        for key, value in places.items():
            s = s.replace(key, value)
        return s

    recipe.write_text(fill(text))
    (work / "notes.txt").write_text("the user's own file")
    monkeypatch.setenv("LORA_SFT_REMOTE_CODE_MARKER", str(work / "remote-code-ran"))
    monkeypatch.chdir(work)
    before, corpus_before = _snapshot(work), _snapshot(HERE)

    args = shlex.split(fill(" ".join(meta.get("args", []))))
    if meta.get("command", ["train"])[0] in ("train", "validate", "preview"):
        argv = [command, str(recipe), *args]
    else:  # a command on a run directory or a folder: the args name it
        argv = [command, *args]
    code = main(argv)

    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    expected = [fill(e) for e in meta["expect"]]
    assert code == 2, err
    assert len(lines) == len(expected) and all(line.startswith("error: ") for line in lines), err
    for line, want in zip(lines, expected):
        assert want in line, f"expected {want!r} in {line!r}"
    assert "Traceback" not in out + err
    assert _snapshot(work) == before
    assert _snapshot(HERE) == corpus_before
