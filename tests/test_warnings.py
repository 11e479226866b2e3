"""Our own deprecation warnings are fixed at the source, not filtered: a training run through the CLI prints none."""

from __future__ import annotations

import logging
import warnings

import pytest
from helpers import REPO

from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft.recipe.load import load_recipe
from lora_sft.settings import resolve


def _planned(write_recipe, tiny_llama, tmp_path, data_format: str, train: str):
    """A recipe on the tiny Llama (classification for the classification format) and its model plan."""
    task = "classification" if data_format == "classification" else "causal_lm"
    recipe = load_recipe(
        write_recipe(
            {
                "task": task,
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(tiny_llama)},
                "data": {"format": data_format, "train": str(REPO / train)},
            }
        )
    )
    return recipe, preflight.prepare(recipe).plan


@pytest.mark.e2e
def test_a_training_run_prints_no_future_or_deprecation_warning(tiny_run):
    _, _, proc = tiny_run  # trained through `python -m lora_sft train`, then evaluated from the saved adapter
    assert "is_gradient_checkpointing" not in proc.stderr
    for kind in ("FutureWarning", "DeprecationWarning", "PendingDeprecationWarning"):
        assert kind not in proc.stderr, proc.stderr[-3000:]
    # nor anything else: no library warning, log record or progress bar (the output is not a terminal)
    assert proc.stderr == "", proc.stderr[-3000:]


@pytest.mark.unit
def test_a_new_classification_head_is_one_line_of_ours(tiny_llama, tmp_path, write_recipe, capfd):
    """transformers reports a new head as MISSING weights, "newly initialized", in a table on every load; load_base
    keeps that report (and the "Loading weights" bars, outside a terminal) quiet and says it in one line."""
    from transformers.utils import logging as transformers_logging

    recipe, plan = _planned(write_recipe, tiny_llama, tmp_path, "classification", "data/quickstart/train.jsonl")
    verbosity = transformers_logging.get_verbosity()
    records: list[logging.LogRecord] = []
    catch = logging.Handler()
    catch.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(catch)  # the library's root logger: it does not propagate
    printed: list[str] = []
    try:
        model = model_stage.load_base(resolve(recipe), plan, log=printed.append)
    finally:
        logging.getLogger("transformers").removeHandler(catch)
    assert plan.heads == ["score"] and model.score.weight.shape == (4, 64)  # 4 labels x hidden 64, no bias
    assert printed == ["score head: new, 256 parameters, trained in full"]
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []  # no LOAD REPORT
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "Loading weights" not in err, err
    assert transformers_logging.get_verbosity() == verbosity  # only around the load


@pytest.mark.unit
def test_wrapping_and_reloading_an_adapter_warns_nothing(tiny_llama, tmp_path, write_recipe):
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it builds a PeftModel;
    model.add_lora and model.load_adapter keep that FutureWarning from reaching the user, and nothing else."""
    recipe, plan = _planned(write_recipe, tiny_llama, tmp_path, "alpaca", "data/examples/alpaca.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = model_stage.add_lora(model_stage.load_base(resolve(recipe), plan), recipe, plan)
        model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
        model_stage.load_adapter(model_stage.load_base(resolve(recipe), plan), tmp_path / "adapter")
    deprecations = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, FutureWarning | DeprecationWarning)
    ]
    assert deprecations == []
    with warnings.catch_warnings(
        record=True
    ) as caught:  # the silencing is scoped: the same warning elsewhere still shows
        warnings.simplefilter("always")
        assert model.get_base_model().is_gradient_checkpointing is True  # train.gradient_checkpointing defaults to true
    assert [str(w.message) for w in caught if w.category is FutureWarning] == [
        "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead."
    ]
