"""No user file is ever deleted: the run directory is marked, `--overwrite` removes only what a run wrote,
and output_dir may not be (or hold) the working directory, the recipe's folder, the data or the model.

Every refusal is one line, exit 2, with every file before and after compared byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from lora_sft.cli.main import main
from lora_sft.errors import UserError
from lora_sft.recipe.load import load_recipe
from lora_sft.run.records import Manifest
from lora_sft.run.rundir import ARTIFACTS, MARKER, ExportDir, RunDir
from lora_sft.run.start import check_output_dir

ROWS = (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()[:16]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def recipe_dict(tiny_llama, output_dir: str, data: str, **train) -> dict:
    return {
        "task": "causal_lm",
        "output_dir": output_dir,
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"format": "alpaca", "train": data, "max_length": 48},
        "train": {
            "lr": 1e-2,
            "max_steps": 2,
            "micro_batch_size": 4,
            "warmup": 0,
            "logging_steps": 1,
            "save_steps": 1,
            "gradient_checkpointing": False,
            **train,
        },
    }


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.e2e
def test_overwrite_refuses_a_foreign_folder_and_removes_only_a_runs_files(tiny_llama, tmp_path, monkeypatch, capsys):
    """The acceptance test: a folder of the user's is refused; on a run, --overwrite removes exactly what the run wrote."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # output_dir: ~/run must expand ~, not make a folder named "~"
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    (project / "train.jsonl").write_text("\n".join(ROWS) + "\n")
    recipe = project / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(sort_keys=False, data=recipe_dict(tiny_llama, "~/run", "train.jsonl")))

    # a folder of the user's: refused with and without --overwrite, nothing touched
    notes = home / "run" / "NOTES.txt"
    notes.parent.mkdir()
    notes.write_text("notes")
    before = snapshot(tmp_path)
    for flags in ([], ["--overwrite"]):
        assert main(["train", str(recipe), *flags]) == 2
        line = one_error(capsys)
        assert line == (
            f"error: {recipe}:2: output_dir: {home / 'run'} is not empty (NOTES.txt) and holds no lora_sft run; "
            "lora_sft writes only into a new or empty folder or a run of its own: set another output_dir"
        )
        assert snapshot(tmp_path) == before
    notes.unlink()

    # an empty folder is fine; the run is marked, ~ expanded
    assert main(["train", str(recipe)]) == 0
    run = home / "run"
    assert not (project / "~").exists()
    marker = json.loads((run / MARKER).read_text())
    assert marker["version"] == 1 and marker["created"]
    assert {p.name for p in run.iterdir()} == {
        MARKER,
        "recipe.yaml",
        "manifest.json",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "adapter",
        "checkpoints",
    }
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2 and "already holds a finished run" in one_error(capsys)

    # the user's files inside the run directory, and stale derived files from the old adapter
    notes.write_text("the user's notes")
    (run / "my-plots").mkdir()
    (run / "my-plots" / "loss.png").write_bytes(b"\x89PNG fake")
    (run / "eval.md").write_text("old eval")
    (run / "export").mkdir()
    (run / "export" / "fidelity.json").write_text("{}")
    (run / "checkpoints" / "checkpoint-99").mkdir()  # a run's checkpoint folder: the run's, removed with it
    old_adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()

    assert main(["train", str(recipe), "--overwrite", "train.max_steps=1", "train.lr=5e-2"]) == 0
    assert notes.read_text() == "the user's notes" and (run / "my-plots" / "loss.png").read_bytes() == b"\x89PNG fake"
    assert {p.name for p in run.iterdir()} == {
        MARKER,
        "recipe.yaml",
        "manifest.json",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "adapter",
        "checkpoints",
        "NOTES.txt",
        "my-plots",
    }
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 1
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter
    assert [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ] == [1]


@pytest.mark.unit
@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"], "validate"])
def test_output_dir_dot_with_the_recipe_and_data_in_cwd_is_refused(tiny_llama, tmp_path, monkeypatch, capsys, flags):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("\n".join(ROWS) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(sort_keys=False, data=recipe_dict(tiny_llama, ".", "train.jsonl")))
    before = snapshot(tmp_path)
    argv = ["validate", str(recipe)] if flags == "validate" else ["train", str(recipe), *flags]
    assert main(argv) == 2
    assert one_error(capsys) == (
        f"error: {recipe}:2: output_dir: . is the working directory; a run must have a folder of its own: "
        "set output_dir to a folder of its own, e.g. runs/my-run"
    )
    assert snapshot(tmp_path) == before


@pytest.mark.unit
def test_every_protected_place_and_its_ancestors_are_refused(tiny_llama, tmp_path, monkeypatch):
    """The recipe's folder (cwd elsewhere), through a symlink, the data folder and its parent, a glob's folder, the model, the template."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    project = tmp_path / "p" / "project"
    (project / "data" / "chats").mkdir(parents=True)
    (project / "data" / "chats" / "a.jsonl").write_text("\n".join(ROWS) + "\n")
    link = tmp_path / "p" / "link"
    link.symlink_to(project)
    recipe = project / "recipe.yaml"

    def refused(output_dir: str, data: str = str(project / "data" / "chats"), **data_options) -> str:
        raw = recipe_dict(tiny_llama, output_dir, data)
        raw["data"].update(data_options)
        recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
        with pytest.raises(UserError) as e:
            check_output_dir(load_recipe(recipe), str(tiny_llama))
        assert len(e.value.problems) == 1
        return e.value.problems[0]

    assert f"is the folder holding the recipe {recipe}" in refused(str(project))
    assert f"output_dir: {link} is the folder holding the recipe {recipe}" in refused(str(link))  # symlinks resolved
    assert f"output_dir: {link / '..'} ({tmp_path / 'p'}) holds the folder holding the recipe" in refused(
        str(link / "..")
    )
    assert f"is the data folder {project / 'data' / 'chats'} (data.train)" in refused(str(project / "data" / "chats"))
    assert f"({project / 'data'}) holds the data folder" in refused(str(project / "data"))
    assert "is inside the data folder" in refused(str(project / "data" / "chats" / "run"))
    assert f"is inside the folder of the data glob {project / 'data' / '**' / '*.jsonl'} (data.train)" in refused(
        str(project / "data" / "chats" / "x" / "run"), data=str(project / "data" / "**" / "*.jsonl")
    )
    assert f"is the model folder {tiny_llama} (model.path)" in refused(str(tiny_llama))
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "t.jinja").write_text("{{ messages }}")
    assert f"holds the chat template {tmp_path / 'templates' / 't.jinja'} (data.chat_template)" in refused(
        str(tmp_path / "templates"), chat_template=str(tmp_path / "templates" / "t.jinja")
    )
    assert "is your home folder" in refused(str(Path.home()))
    assert "is the root folder" in refused("/")
    assert "holds the working directory" in refused(str(tmp_path))

    # allowed: a new folder next to them, inside the model folder's parent, a run's own saved recipe used to resume it
    raw = recipe_dict(tiny_llama, str(project / "runs" / "a"), str(project / "data" / "chats"))
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    check_output_dir(load_recipe(recipe), str(tiny_llama))
    run = RunDir(project / "runs" / "a")
    run.create(raw, Manifest.new(0, "x", {}, "test"))
    check_output_dir(load_recipe(run.recipe), str(tiny_llama))


@pytest.mark.unit
def test_a_run_is_recognised_by_its_marker_or_a_lora_sft_manifest(tmp_path):
    user = RunDir(tmp_path / "user")
    user.root.mkdir()
    user.recipe.write_text("task: causal_lm\n")  # a user's own recipe.yaml
    assert not user.holds_run()
    legacy = RunDir(tmp_path / "legacy")
    legacy.root.mkdir()
    legacy.recipe.write_text("task: causal_lm\n")
    legacy.manifest.write_text(json.dumps({"data_fingerprint": "abc", "versions": {"lora_sft": "0.1.0"}}))
    assert legacy.holds_run()
    legacy.manifest.write_text(json.dumps({"data_fingerprint": "abc"}))
    assert not legacy.holds_run()

    run = RunDir(tmp_path / "run")
    run.create({"task": "causal_lm"}, Manifest.new(0, "abc", {}, "test"))
    assert run.holds_run() and run.marker.is_file()
    (run.root / "mine.txt").write_text("keep")
    (run.root / "summary.json.tmp").write_text("{")
    for name in ("loss.png", "loss.png.tmp", "tensorboard/events.out.tfevents.1"):  # the plot, the trackers' files
        (run.root / name).parent.mkdir(exist_ok=True)
        (run.root / name).write_bytes(b"written by the run")
    run.remove_run()
    assert [p.name for p in run.root.iterdir()] == ["mine.txt"]
    assert set(ARTIFACTS) >= {
        MARKER,
        "recipe.yaml",
        "manifest.json",
        "metrics.jsonl",
        "summary.json",
        "adapter",
        "checkpoints",
        "eval.md",
        "export",
    }


@pytest.mark.unit
def test_drop_derived_removes_what_described_the_old_adapter(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create({"task": "causal_lm"}, Manifest.new(0, "", {}, "test"))
    run.summary.write_text(
        json.dumps({"steps": 3, "evaluation": {"rows": 2}})
    )  # a summary with an evaluation of the old adapter
    run.eval_report.write_text("old")
    (run.export / "adapter").mkdir(parents=True)
    run.drop_derived()
    assert not run.eval_report.exists() and not run.export.exists()
    assert json.loads(run.summary.read_text()) == {"steps": 3}


@pytest.mark.unit
@pytest.mark.parametrize("removal", ["drop_derived", "remove_run"])
def test_a_stale_export_goes_and_the_users_files_in_it_stay(tmp_path, removal):
    """A new adapter (train --resume, --overwrite) makes export/ stale: what export wrote there goes, a file the user
    put there (next to it or inside its adapter/) stays."""
    run = RunDir(tmp_path / "run")
    run.create({"task": "causal_lm"}, Manifest.new(0, "", {}, "test"))
    with ExportDir(run.export).owned().staged("--out", "fix") as staging:
        ExportDir(staging).mark(run.root)
        (staging / "adapter").mkdir()
        (staging / "adapter" / "adapter_config.json").write_text("{}")
        (staging / "fidelity.json").write_text("{}")
    (run.export / "serve.sh").write_text("the user's script")
    (run.export / "adapter" / "notes.md").write_text("the user's notes")
    getattr(run, removal)()
    assert {str(p.relative_to(run.export)): p.is_file() for p in run.export.rglob("*")} == {
        "serve.sh": True,
        "adapter": False,
        "adapter/notes.md": True,
    }


@pytest.mark.unit
def test_cli_top_level_debug_and_argument_errors(tmp_path, capsys):
    with pytest.raises(UserError):  # --debug before the command is honoured: the error is raised, not printed
        main(["--debug", "validate", str(tmp_path / "missing.yaml")])
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert one_error(capsys) == f"error: {tmp_path / 'missing.yaml'}: recipe file not found"
    for argv, flag in (
        (["export", "x", "--samples", "0"], "--samples"),
        (["export", "x", "--tolerance", "nan"], "--tolerance"),
        (["generate", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["preview", "r.yaml", "-n", "-2"], "-n"),
        (["export", "x", "--max-shard-size", "lots"], "--max-shard-size"),
    ):
        assert main(argv) == 2
        line = one_error(capsys)
        assert f"argument {flag}: " in line and "usage:" not in line, line


@pytest.mark.unit
def test_preview_into_a_closed_pipe_exits_quietly(tiny_llama, tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(ROWS) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            sort_keys=False, data=recipe_dict(tiny_llama, str(tmp_path / "run"), str(tmp_path / "train.jsonl"))
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_sft", "preview", str(recipe), "-n", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    proc.stdout.close()  # `| head` that has read enough: every write now fails with a broken pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert not (tmp_path / "run").exists()
