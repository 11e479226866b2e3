"""Inputs the bad-input corpus cannot hold (git keeps no named pipe, symlink loop or unreadable file): each is
refused in one line with exit 2, before anything is written, and never blocks or ends in exit 1.

The permission cases need a process that file modes bind. These tests run as root, whom modes do not bind, so
there the command runs in a child without the capabilities that let root read any file (CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH, dropped with util-linux's setpriv): the kernel refuses the read as it would for any user.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from lora_sft.cli.main import main

pytestmark = pytest.mark.unit
ALPACA = REPO / "data" / "examples" / "alpaca.jsonl"


def _recipe(tmp_path: Path, model: Path, train: str, **top) -> Path:
    recipe = {
        "task": "causal_lm",
        "output_dir": str(tmp_path / "out"),
        "model": {"path": str(model)},
        "data": {"format": "alpaca", "train": train},
    } | top
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _refused(capsys, argv: list[str], *wanted: str) -> list[str]:
    """Run the command; it must exit 2 with one `error:` line per wanted text, in order, and no traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in out + err
    assert len(lines) == len(wanted) and all(line.startswith("error: ") for line in lines), err
    for line, want in zip(lines, wanted):
        assert want in line, f"expected {want!r} in {line!r}"
    return lines


def _both(capsys, recipe: Path, *wanted: str, args: tuple[str, ...] = ()) -> None:
    """train and validate refuse it the same way, and train writes no run directory."""
    for command in ("train", "validate"):
        _refused(capsys, [command, str(recipe), *args], *wanted)
    assert not (recipe.parent / "out").exists()


@pytest.fixture
def unread():
    """Watch each FIFO given: a reader that opens one (what must never happen) is let go at once with end-of-file,
    and counted, so a regression fails on the count instead of hanging the suite."""
    stop, opened = threading.Event(), []

    def watch(fifo: Path) -> None:
        while not stop.wait(0.05):
            try:  # opening for writing without blocking succeeds only while a reader holds the pipe open
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                continue
            opened.append(fifo)

    def arm(fifo: Path) -> None:
        threading.Thread(target=watch, args=(fifo,), daemon=True).start()

    yield arm
    stop.set()
    assert not opened, f"opened for reading: {opened}"


def test_a_named_pipe_as_the_data_file_is_refused_unread(tiny_llama, tmp_path, capsys, unread):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    unread(fifo)
    recipe = _recipe(tmp_path, tiny_llama, str(fifo))
    _both(capsys, recipe, f"data.train: {fifo} is a named pipe (FIFO), not a file; write the data to a file")


def test_a_named_pipe_inside_a_data_folder_is_refused(tiny_llama, tmp_path, capsys, unread):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(ALPACA, folder / "a.jsonl")
    os.mkfifo(folder / "b.jsonl")
    unread(folder / "b.jsonl")
    recipe = _recipe(tmp_path, tiny_llama, str(folder))
    _both(capsys, recipe, f"{folder / 'b.jsonl'} is a named pipe (FIFO), not a file")


def test_a_named_pipe_as_the_recipe_is_refused(tmp_path, capsys, unread):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    unread(fifo)
    _refused(capsys, ["validate", str(fifo)], f"{fifo}: the recipe is a named pipe (FIFO), not a file")


def test_a_broken_link_in_a_data_folder_is_refused_by_name(tiny_llama, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(ALPACA, folder / "a.jsonl")
    (folder / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    recipe = _recipe(tmp_path, tiny_llama, str(folder))
    _both(capsys, recipe, f"{folder / 'b.jsonl'} is a broken link, not a file")


def test_file_names_that_are_not_utf8_are_refused(tiny_llama, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    odd = os.fsdecode(b"rows\xff.jsonl")  # as Python hands such a name over: rows\udcff.jsonl
    shutil.copy(ALPACA, folder / odd)
    recipe = _recipe(tmp_path, tiny_llama, str(folder))
    _both(capsys, recipe, f"the file name '{folder}/rows\\udcff.jsonl' is not valid UTF-8; rename it")
    # the same name given as an override, and as the recipe's own name
    _both(
        capsys,
        _recipe(tmp_path, tiny_llama, str(ALPACA)),
        f"data.train: '{folder}/rows\\udcff.jsonl' is not valid UTF-8 text",
        args=(f"data.train={folder / odd}",),
    )
    named = tmp_path / os.fsdecode(b"recipe\xff.yaml")
    shutil.copy(tmp_path / "recipe.yaml", named)
    _refused(capsys, ["validate", str(named)], "'s file name is not valid UTF-8")


def test_an_output_dir_through_a_symlink_loop_is_refused(tiny_llama, tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for output_dir in (tmp_path / "a", tmp_path / "a" / "run"):
        recipe = _recipe(tmp_path, tiny_llama, str(ALPACA), output_dir=str(output_dir))
        _both(capsys, recipe, f"output_dir: cannot use {output_dir}: it runs through a symlink loop")
    # the commands on a run directory: the run named, and the file they write
    _refused(capsys, ["plot", str(tmp_path / "a")], f"{tmp_path / 'a'}: cannot use {tmp_path / 'a'}: it runs through")
    _refused(capsys, ["export", str(tmp_path / "a")], "it runs through a symlink loop")


def test_a_data_cache_that_is_a_file_is_refused(tiny_llama, tmp_path, capsys, monkeypatch):
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("LORA_SFT_CACHE", str(tmp_path / "cache" / "deeper"))
    recipe = _recipe(tmp_path, tiny_llama, str(ALPACA))
    _both(capsys, recipe, f"LORA_SFT_CACHE={tmp_path / 'cache' / 'deeper'}: the data cache would go in")
    err = _refused(capsys, ["preview", str(recipe)], "is a file, not a folder; point LORA_SFT_CACHE at a folder")
    assert str(tmp_path / "cache") in err[0]
    assert main(["validate", str(recipe), "data.cache=false"]) == 0  # without the cache nothing goes there
    assert (tmp_path / "cache").read_text() == "not a folder"


def test_names_with_a_newline_stay_on_one_line(tiny_llama, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "two\nlines.jsonl").write_text('{"instruction": "x"}\n')  # no output: one bad row
    recipe = _recipe(tmp_path, tiny_llama, str(folder))
    lines = _refused(capsys, ["validate", str(recipe)], "two\\nlines.jsonl:1: ")
    assert "missing" in lines[0]


def _without_read_permission(tmp_path: Path, argvs: list[list[str]]) -> list[tuple[int, str]]:
    """Run each command line in one child process that file modes bind; (exit code, stderr) of each."""
    script = (
        "import contextlib, io, json, sys\n"
        "from lora_sft.cli.main import main\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        out.append((main(argv), err.getvalue()))\n"
        "print(json.dumps(out))\n"
    )
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "running as root, the permission cases need util-linux's setpriv to drop root's file access"
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]
    env = os.environ | {"PYTHONPATH": str(REPO), "LORA_SFT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [*prefix, sys.executable, "-c", script, json.dumps(argvs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return [tuple(pair) for pair in json.loads(done.stdout.strip().splitlines()[-1])]


def test_files_without_read_permission_are_refused_in_one_line(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").chmod(0)
    recipe = _recipe(tmp_path, model, str(ALPACA))
    run = tmp_path / "run"  # a run directory whose metrics the user may not read
    run.mkdir()
    (run / ".lora_sft-run").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (run / "metrics.jsonl").chmod(0)
    results = _without_read_permission(
        tmp_path, [["validate", str(recipe)], ["plot", str(run), "--out", str(tmp_path / "plot.png")]]
    )
    (code, err), (plot_code, plot_err) = results
    assert code == 2 and err.splitlines() == [
        f"error: {recipe}:5: model.path: {model / 'model.safetensors'}: cannot read it (Permission denied); fix its permissions"
    ], err
    assert plot_code == 2 and plot_err.splitlines() == [
        f"error: {run / 'metrics.jsonl'}: cannot read it (Permission denied); fix its permissions"
    ], plot_err
    assert not (tmp_path / "out").exists() and not (tmp_path / "plot.png").exists()


@pytest.mark.parametrize("damage", ["truncate", "empty"])
@pytest.mark.parametrize(
    "marker,victim",  # the tokenized folder (train.arrow) or the checked rows' (checked.arrow), and the file damaged
    [
        ("train.arrow", "train.arrow"),
        ("train.arrow", "meta.json"),
        ("checked.arrow", "checked.arrow"),
        ("checked.arrow", "train.npy"),
        ("checked.arrow", "meta.json"),
    ],
)
def test_a_damaged_data_cache_is_built_again(tiny_llama, tmp_path, capsys, monkeypatch, marker, victim, damage):
    monkeypatch.setenv("LORA_SFT_CACHE", str(tmp_path / "cache"))
    recipe = _recipe(tmp_path, tiny_llama, str(ALPACA))
    preview = ["preview", str(recipe), "--json", "-n", "2"]
    assert main(preview) == 0
    first = capsys.readouterr()
    found = (tmp_path / "cache" / "tokenized").glob(f"*/{marker}")
    (folder,) = (p.parent for p in found if not p.parent.name.startswith("lora_sft-work-"))  # this process's
    data = (folder / victim).read_bytes()
    (folder / victim).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"")
    assert main(preview) == 0
    out, err = capsys.readouterr()
    assert out == first.out  # the same samples, from data built again
    note, rest = err.split("\n", 1)
    assert note.startswith(f"note: the data cache {folder} is damaged (") and note.endswith("built again"), err
    assert rest == first.err  # the stats preview prints, and nothing else
    assert main(preview) == 0  # the cache built again is whole: no note
    assert capsys.readouterr() == first


def test_sigterm_in_the_data_stage_leaves_no_work_folders(tiny_llama, tmp_path):
    rows = [json.loads(line) for line in ALPACA.read_text().splitlines()]
    with (tmp_path / "big.jsonl").open("w") as f:  # enough rows that the data stage is still at work when stopped
        for i in range(60_000):
            f.write(
                json.dumps(rows[i % len(rows)] | {"instruction": f"{rows[i % len(rows)]['instruction']} {i}"}) + "\n"
            )
    recipe = _recipe(tmp_path, tiny_llama, str(tmp_path / "big.jsonl"))
    cache = tmp_path / "cache"
    env = os.environ | {"PYTHONPATH": str(REPO), "LORA_SFT_CACHE": str(cache)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_sft", "validate", str(recipe)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob("tokenized/lora_sft-work-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the data stage never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err  # ended by the signal, as before
    assert not cache.exists(), sorted(cache.rglob("*"))  # its work folders and the cache folder it made: gone


def test_init_writes_names_with_a_newline_as_a_valid_recipe(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data = tmp_path / "tiny\nllama", tmp_path / "my\ndata.jsonl"
    shutil.copytree(tiny_llama, model)
    shutil.copy(ALPACA, data)
    out = tmp_path / "recipe.yaml"
    assert main(["init", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    text = out.read_text()
    lines = text.splitlines()
    header = lines[: next(i for i, line in enumerate(lines) if line.startswith("task:"))]
    assert all(line.startswith("#") for line in header), header  # the header comment is not cut by the names
    assert f"--model {tmp_path}/tiny\\nllama --data {tmp_path}/my\\ndata.jsonl" in header[0]
    recipe = yaml.safe_load(text)
    assert (recipe["model"]["path"], recipe["data"]["train"]) == (str(model), str(data))
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0, capsys.readouterr().err


def test_export_onto_a_base_folder_that_now_holds_another_model(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORA_SFT_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    recipe = _recipe(tmp_path, base, str(ALPACA), output_dir=str(tmp_path / "run"))
    settings = ["train.max_steps=1", "train.micro_batch_size=2", "data.max_length=64", "lora.rank=4"]
    assert main(["train", str(recipe), "--quiet", *settings]) == 0
    shutil.rmtree(base)  # the folder the run trained on now holds a model of another shape
    shutil.copytree(REPO / "tests" / "bad_inputs" / "model_small_vocab", base)
    capsys.readouterr()
    lines = _refused(
        capsys,
        ["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")],
        f"{tmp_path / 'run'}: the adapter does not fit the model in {base} (model.path of the run): 14 tensors differ in shape, the first base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
    )
    assert lines[0].endswith(
        "that folder now holds another model than the run trained on: put the base the run trained on back there (its recipe.yaml names the folder)"
    )
    assert not (tmp_path / "export").exists()
