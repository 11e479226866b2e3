"""train.report_to: the experiment trackers (tensorboard, wandb, mlflow, trackio) the Trainer reports to.

Transformers' own integration callbacks do the reporting (`training_arguments` passes report_to and run_name, the
run directory's folder name); under a launcher they report from the main process only. What lora_sft adds:

- `problems`: a tracker whose package is missing is a recipe error in the preflight (validate and train), naming
  the extra to install, instead of a RuntimeError when the Trainer is built; so is a folder a tracker writes that is
  a file or cannot be made (TensorBoard's, wandb's WANDB_DIR, an MLflow folder store) and an MLflow tracking server
  that does not answer, each found before the run directory exists instead of once training has begun.
- `attach`: TensorBoard writes into RUN_DIR/tensorboard (unless TENSORBOARD_LOGGING_DIR says otherwise: transformers'
  default would be inside the checkpoint staging folder); `TrackerRun` logs the recipe, flattened (`recipe.lora.rank`),
  as the run's config / hyperparameters, and keeps the tracker's run open for the evaluation that follows training
  (`train.evaluate_after`): MLflow's callback ends its run when training ends, and a metric logged after that would
  start a second, nameless run. The run ends after that evaluation.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from transformers import TrainerCallback

from lora_sft.errors import UserError
from lora_sft.recipe.schema import Recipe
from lora_sft.run.rundir import RunDir, check_writable
from lora_sft.settings import RunSettings

# the modules a tracker's integration imports (any one of them will do)
MODULES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
}


def problems(recipe: Recipe) -> list[str]:
    """Trackers the Trainer could not report to on this machine, found before the run directory exists: their package
    is missing (or switched off), the folder they write is a file or cannot be made, the tracking server does not
    answer; each would otherwise fail once training has begun."""
    where, out = recipe.where("train", "report_to"), []
    for name in recipe.train.report_to:
        if not any(importlib.util.find_spec(module) for module in MODULES[name]):
            out.append(f'{where}: {name} needs its package: pip install "lora-sft[{name}]"')
        elif name == "mlflow" and os.environ.get("DISABLE_MLFLOW_INTEGRATION", "").upper() == "TRUE":
            out.append(
                f"{where}: mlflow, but the environment sets DISABLE_MLFLOW_INTEGRATION=TRUE, which turns transformers' MLflow reporting off; unset it, or remove mlflow from report_to"
            )
        elif name == "mlflow" and (problem := mlflow_store_problem()):
            out.append(f"{where}: mlflow: {problem}")
        else:
            out += _folder_problems(recipe, name, f"{where}: {name}")
    return out


def _folders(recipe: Recipe, name: str) -> list[tuple[Path, str]]:
    """The folders tracker `name` writes into, with the setting that names each."""
    if name == "tensorboard":
        if folder := os.environ.get("TENSORBOARD_LOGGING_DIR"):
            return [(Path(folder).expanduser(), "TENSORBOARD_LOGGING_DIR")]
        return [(RunDir(recipe.output_dir).tensorboard, "output_dir")]  # `attach`: inside the run directory
    if name == "wandb":  # wandb writes its run folders under WANDB_DIR/wandb (the working directory by default)
        return [(Path(os.environ.get("WANDB_DIR") or ".").expanduser() / "wandb", "WANDB_DIR")]
    if name == "trackio" and (folder := os.environ.get("TRACKIO_DIR")):
        return [(Path(folder).expanduser(), "TRACKIO_DIR")]
    return []


def _folder_problems(recipe: Recipe, name: str, where: str) -> list[str]:
    """The folders tracker `name` writes into (`_folders`): each must be a folder or one that can be made
    (rundir's `check_writable`, which writes nothing)."""
    out = []
    for folder, key in _folders(recipe, name):
        try:
            check_writable(folder, where, key)
        except UserError as e:
            out += e.problems
    return out


# seconds a tracking server (MLFLOW_TRACKING_URI http://...) has to answer the preflight's one request
ANSWER_TIMEOUT = 5.0


def _unanswered(uri: str) -> str | None:
    """Why the server at `uri` does not answer an HTTP request within ANSWER_TIMEOUT; None when it answers (any
    status: a login page or a 404 is a server there)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri, timeout=ANSWER_TIMEOUT).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as e:  # URLError (refused, no such host), a timeout, a URL urllib cannot read
        reason = " ".join(str(getattr(e, "reason", e)).split())
        return f"the tracking server MLFLOW_TRACKING_URI {uri} does not answer within {ANSWER_TIMEOUT:g} s ({reason}); start it, or set MLFLOW_TRACKING_URI to one that runs"
    return None


def mlflow_store_problem() -> str | None:
    """Where MLflow would write (MLFLOW_TRACKING_URI, or its default) and it would refuse only once training has
    begun: a local folder store, which MLflow 3 keeps only behind MLFLOW_ALLOW_FILE_STORE=true, or a database
    (MLflow 3's default, sqlite:///mlflow.db) without SQLAlchemy, which the mlflow-skinny client leaves out."""
    import mlflow
    from mlflow import environment_variables

    uri = mlflow.get_tracking_uri()
    scheme = urlparse(uri).scheme
    allow_files = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)  # MLflow 3's switch
    if scheme in ("", "file") and allow_files is not None and not allow_files.get():
        return f"the tracking store {uri} is a local folder, which MLflow {mlflow.__version__} refuses unless MLFLOW_ALLOW_FILE_STORE=true; set that, or set MLFLOW_TRACKING_URI to your tracking server (http://...)"
    if scheme in ("", "file"):  # a folder store: a folder, or one that can be made
        folder = Path(url2pathname(urlparse(uri).path) if scheme else uri).expanduser()
        try:
            check_writable(folder, "the tracking store", "MLFLOW_TRACKING_URI")
        except UserError as e:
            return e.problems[0]
    if scheme in ("http", "https"):
        return _unanswered(uri)
    if (
        scheme.split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql")
        and importlib.util.find_spec("sqlalchemy") is None
    ):
        how = "MLflow's default store" if "MLFLOW_TRACKING_URI" not in os.environ else "MLFLOW_TRACKING_URI"
        return f"{how} {uri} is a database, which needs the full MLflow package (pip install mlflow; lora-sft[mlflow] is the mlflow-skinny client); or set MLFLOW_TRACKING_URI to your tracking server (http://...)"
    return None


def flat_config(recipe: dict[str, Any], prefix: str = "recipe") -> dict[str, Any]:
    """The recipe as one level of keys (`recipe.lora.rank: 8`), what every tracker takes as config: numbers, strings
    and booleans as they are, lists and nulls as JSON text (`recipe.lora.target_modules: '["q_proj", "v_proj"]'`)."""
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name))
        elif isinstance(value, str | int | float | bool):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def attach(trainer, recipe: RunSettings, run_dir: RunDir) -> None:
    """The trackers of train.report_to, set up on the Trainer that reports to them (nothing without report_to)."""
    if not recipe.train.report_to:
        return
    from transformers.integrations import TensorBoardCallback

    tensorboard = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
    for callback in tensorboard:
        if callback.logging_dir is None:
            callback.logging_dir = str(run_dir.tensorboard)
    trainer.add_callback(
        TrackerRun(recipe.saved_dict(), recipe.train.report_to, bool(trainer.eval_dataset), tensorboard)
    )


class TrackerRun(TrainerCallback):
    """The recipe as the tracker run's config, when training begins (the integrations have started their runs by
    then); the run ends after the last evaluation: when training ends, or after the evaluation that follows it."""

    def __init__(self, recipe: dict[str, Any], names: list[str], evaluates_after: bool, tensorboard: list):
        self.config = flat_config(recipe)
        self.tensorboard = tensorboard  # transformers' TensorBoardCallback: its writer exists once training begins
        self.names = names
        self.evaluates_after = evaluates_after
        self.trained = False
        self.reopened_mlflow = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if "tensorboard" in self.names:
            self.tensorboard_hparams()
        if "wandb" in self.names:
            import wandb

            wandb.config.update(self.config, allow_val_change=True)
        if "trackio" in self.names:
            import trackio  # type: ignore[import-not-found]

            trackio.config.update(self.config, allow_val_change=True)
        if "mlflow" in self.names:
            import mlflow
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

            mlflow.log_params({k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in self.config.items()})

    def tensorboard_hparams(self) -> None:
        """The recipe in TensorBoard's HPARAMS tab, in the run's own event files, with the losses as its metrics."""
        from torch.utils.tensorboard.summary import hparams

        for writer in (c.tb_writer for c in self.tensorboard if c.tb_writer is not None):
            # torch's add_hparams would write them into a new sub-folder, a run of their own: write the three
            # summaries it makes into the writer's folder instead, next to the scalars they describe
            for summary in hparams(self.config, {"train/loss": 0.0, "eval/loss": 0.0}):
                writer.file_writer.add_summary(summary)
            writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.trained = True
        if not self.evaluates_after:
            self.finish()
        elif "mlflow" in self.names:
            import mlflow

            # MLflow's callback ended the run it started: the evaluation after training belongs in it
            last = mlflow.last_active_run()
            if mlflow.active_run() is None and last is not None:
                mlflow.start_run(run_id=last.info.run_id)
                self.reopened_mlflow = True

    def on_evaluate(self, args, state, control, **kwargs):
        if self.trained and state.is_world_process_zero:
            self.finish()

    def finish(self) -> None:
        """End the tracker runs this run reported to, once its last metric is logged."""
        if "wandb" in self.names:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        if "mlflow" in self.names and self.reopened_mlflow:
            import mlflow

            mlflow.end_run()
            self.reopened_mlflow = False
