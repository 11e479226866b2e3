"""train.report_to: a tiny run reports to TensorBoard, wandb (offline) and MLflow (a local file store) at once, and
each tracker's own files are read back: the scalars equal metrics.jsonl's, the run's name is the run directory's,
the recipe is the run's config. A tracker whose package is missing is a recipe error, naming the extra."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest
import yaml
from helpers import REPO

from lora_sft.cli.main import main
from lora_sft.recipe.load import load_recipe
from lora_sft.run import trackers
from lora_sft.run.rundir import RunDir


@pytest.fixture(scope="module")
def tracked(tiny_llama, tmp_path_factory):
    """A tiny run (4 steps, an evaluation every 2 and after training) reporting to three trackers, trained through
    the CLI in a folder of its own; the trackers write only where they are told (nothing lands in the working dir)."""
    root = tmp_path_factory.mktemp("tracked")
    recipe = {
        "task": "causal_lm",
        "output_dir": str(root / "tracked-run"),
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "format": "alpaca",
            "train": str(REPO / "data/examples/alpaca.jsonl"),
            "eval_fraction": 0.125,
            "max_length": 64,
        },
        "train": {
            "lr": 3e-2,
            "max_steps": 4,
            "micro_batch_size": 8,
            "warmup": 0,
            "logging_steps": 1,
            "eval_steps": 2,
            "save_steps": 2,
            "report_to": ["tensorboard", "wandb", "mlflow"],
        },
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = os.environ | {
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 asks for a database; its file store is a local one to read back
    }
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "train", "recipe.yaml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["mlruns", "recipe.yaml", "tracked-run", "wandb"]
    return RunDir(root / "tracked-run"), root


def series(run: RunDir, metric: str) -> list[tuple[int, float]]:
    return [(r["step"], r[metric]) for r in run.read_metrics() if metric in r]


def config(run: RunDir) -> dict:
    """What every tracker gets as the run's config: the recipe the run directory saved, flattened."""
    return trackers.flat_config(yaml.safe_load(run.recipe.read_text()))


@pytest.mark.e2e
def test_tensorboard_has_the_scalars_of_metrics_jsonl_and_the_recipe(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run, _ = tracked
    events = EventAccumulator(str(run.tensorboard))  # RUN_DIR/tensorboard, not the checkpoint staging folder
    events.Reload()
    for tag, metric in (("train/loss", "loss"), ("eval/loss", "eval_loss"), ("train/learning_rate", "learning_rate")):
        logged = series(run, metric)
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)] == logged, tag
    # before, during, and at the last step: that evaluation is also the one after training (summary.json), not
    # run a second time
    assert [s for s, _ in series(run, "eval_loss")] == [0, 2, 4]
    assert run.read_summary().eval_loss == series(run, "eval_loss")[-1][1]
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    expected = config(run)
    assert set(hparams) == set(expected) and expected["recipe.lora.rank"] == 4
    for key, value in expected.items():
        got = hparams[key]
        assert (got.string_value if isinstance(value, str) else got.number_value) == value, key
    assert expected["recipe.lora.target_modules"] == '["q_proj", "v_proj"]'


def wandb_records(run_file) -> list:
    """The records of a wandb run file (LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header
    crc32 / length / type, after the file's 7-byte `:W&B` header), parsed as wandb's protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts, records = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(parts))
            parts = b""
    return records


@pytest.mark.e2e
def test_wandb_offline_run_has_the_metrics_the_name_and_the_recipe(tracked):
    run, root = tracked
    [run_file] = (root / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    [named] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert named.display_name == "tracked-run" and kinds[-1] == "exit"  # finished, after the last evaluation
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}  # "train/loss" is nested
        for r in records
        if r.HasField("history")
    ]
    for key, metric in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        assert [(h["train/global_step"], h[key]) for h in history if key in h] == series(run, metric)
    updates = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
    expected = config(run)
    assert {k: v for k, v in updates.items() if k.startswith("recipe.")} == expected


@pytest.mark.e2e
def test_mlflow_run_has_the_metrics_the_name_and_the_recipe(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    run, root = tracked
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{root / 'mlruns'}")
    # one run: the evaluation after training is logged in it, not in a second run MLflow would start for it
    [logged] = client.search_runs(experiment_ids=["0"])
    assert logged.info.run_name == "tracked-run" and logged.info.status == "FINISHED"
    for metric in ("loss", "eval_loss", "learning_rate"):
        history = sorted(client.get_metric_history(logged.info.run_id, metric), key=lambda m: (m.step, m.timestamp))
        assert [(m.step, m.value) for m in history] == series(run, metric), metric
    params = logged.data.params
    assert {k: v for k, v in params.items() if k.startswith("recipe.")} == {k: str(v) for k, v in config(run).items()}


@pytest.mark.unit
def test_flat_config_keeps_numbers_and_writes_lists_and_nulls_as_json():
    recipe = {
        "task": "causal_lm",
        "lora": {"rank": 8, "rslora": False, "target_modules": ["q_proj"]},
        "hub": {"repo_id": None},
    }
    assert trackers.flat_config(recipe) == {
        "recipe.task": "causal_lm",
        "recipe.lora.rank": 8,
        "recipe.lora.rslora": False,
        "recipe.lora.target_modules": '["q_proj"]',
        "recipe.hub.repo_id": "null",
    }


def reporting(model: str, *names: str) -> dict:
    """A recipe reporting to `names`."""
    return {
        "task": "causal_lm",
        "output_dir": "out",
        "model": {"path": model},
        "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl")},
        "train": {"report_to": list(names)},
    }


def uninstall(monkeypatch, module: str) -> None:
    """`module` looks not installed to importlib (what the preflight asks)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


@pytest.mark.unit
def test_a_tracker_without_its_package_is_a_recipe_error(tiny_llama, write_recipe, monkeypatch, capsys):
    real = importlib.util.find_spec
    uninstall(monkeypatch, "wandb")
    path = write_recipe(reporting(str(tiny_llama), "tensorboard", "wandb"))
    monkeypatch.chdir(path.parent)
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f'error: {path}:9: train.report_to: wandb needs its package: pip install "lora-sft[wandb]"'
    ]
    # one tracker given as a word is a list of one
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert main(["validate", str(path), "train.report_to=tensorboard"]) == 0


@pytest.mark.unit
def test_an_mlflow_store_mlflow_would_refuse_once_training_began_is_a_recipe_error(monkeypatch, tmp_path):
    import mlflow

    from lora_sft.recipe.schema import Recipe

    recipe = Recipe.model_validate(reporting("unused", "mlflow"))
    uninstall(monkeypatch, "sqlalchemy")
    folder, database = f"file:{tmp_path / 'mlruns'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    refused_folder = f"the tracking store {folder} is a local folder, which MLflow {mlflow.__version__} refuses unless MLFLOW_ALLOW_FILE_STORE=true; set that, or set MLFLOW_TRACKING_URI to your tracking server (http://...)"
    refused_database = f"MLFLOW_TRACKING_URI {database} is a database, which needs the full MLflow package (pip install mlflow; lora-sft[mlflow] is the mlflow-skinny client); or set MLFLOW_TRACKING_URI to your tracking server (http://...)"
    for uri, allow_files, refused in (
        (folder, None, refused_folder),
        (folder, "true", None),
        (database, None, refused_database),  # no SQLAlchemy: the mlflow-skinny client
    ):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        if allow_files is None:
            monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", allow_files)
        assert trackers.problems(recipe) == ([f"train.report_to: mlflow: {refused}"] if refused else []), uri
    assert not list(tmp_path.iterdir())  # nothing was created to find this out


def _free_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.unit
def test_an_mlflow_server_that_does_not_answer_is_refused_before_the_run_directory_exists(
    tiny_llama, write_recipe, tmp_path, monkeypatch, capsys
):
    """MLflow's client met a server that does not answer once training had begun (the run directory written);
    the preflight asks it once, with a short timeout. A server that answers at all (here one that says 404 to
    everything) is a server there."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    path = write_recipe(reporting(str(tiny_llama), "mlflow") | {"output_dir": str(tmp_path / "run")})
    monkeypatch.chdir(tmp_path)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
        assert trackers.problems(load_recipe(path)) == []
    finally:
        server.shutdown()
        server.server_close()
    silent = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", silent)
    for command in ("validate", "train"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"error: {path}:9: train.report_to: mlflow: the tracking server MLFLOW_TRACKING_URI {silent} does not answer within 5 s ("
        ), err
        assert err[0].endswith("; start it, or set MLFLOW_TRACKING_URI to one that runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # no run directory


@pytest.mark.unit
def test_a_tracker_folder_that_is_a_file_is_refused_before_the_run_directory_exists(
    tiny_llama, write_recipe, tmp_path, monkeypatch, capsys
):
    """TensorBoard's TENSORBOARD_LOGGING_DIR, wandb's WANDB_DIR and an MLflow folder store (file:) that are files,
    or lie under one, failed once training had begun; each is one line in the preflight naming the variable."""
    from lora_sft.recipe.schema import Recipe

    (tmp_path / "a-file").write_text("the user's")
    a_file = tmp_path / "a-file"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.chdir(tmp_path)
    cases = {
        "tensorboard": (
            "TENSORBOARD_LOGGING_DIR",
            str(a_file),
            f"train.report_to: tensorboard: {a_file} is a file, not a folder; set TENSORBOARD_LOGGING_DIR to a folder",
        ),
        "wandb": (
            "WANDB_DIR",
            str(a_file),
            f"train.report_to: wandb: cannot create {a_file / 'wandb'}: {a_file} is a file, not a folder; set WANDB_DIR to a folder",
        ),
        "mlflow": (
            "MLFLOW_TRACKING_URI",
            f"file:{a_file}",
            f"train.report_to: mlflow: the tracking store: {a_file} is a file, not a folder; set MLFLOW_TRACKING_URI to a folder",
        ),
    }
    for name, (variable, value, refused) in cases.items():
        recipe = Recipe.model_validate(reporting(str(tiny_llama), name))
        if name != "mlflow":  # the defaults: the run directory, the working directory (MLflow's: a database)
            assert trackers.problems(recipe) == [], name
        monkeypatch.setenv(variable, value)
        assert trackers.problems(recipe) == [refused]
        monkeypatch.setenv(variable, str(tmp_path / "folder") if name != "mlflow" else f"file:{tmp_path / 'folder'}")
        assert trackers.problems(recipe) == []  # a folder that can be made
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(a_file / "logs"))
    path = write_recipe(reporting(str(tiny_llama), "tensorboard") | {"output_dir": str(tmp_path / "run")})
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}:9: train.report_to: tensorboard: cannot create {a_file / 'logs'}: {a_file} is a file, not a folder; set TENSORBOARD_LOGGING_DIR to a folder\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "recipe.yaml"]
