"""The recipe library (recipes/library/): every header's memory estimate is what `validate RECIPE --target cuda:NGiB`
prints for the GPU its name gives (a drift fails; LORA_SFT_REGENERATE=1 rewrites the header from it on purpose), each recipe within the GPU its name gives, the models and
GPU sizes the library promises, and the sizes it leaves out really not fitting. `validate` on every file is
tests/test_validate.py's (helpers.RECIPES holds these too).

The hub models' shapes come from lora_sft's table of known models (what `validate` plans with offline); the
encoders, which the table (Llama-shaped decoders) cannot describe, from their published config.json in
tests/data/model_configs/<org>--<name>/."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from helpers import RECIPES, REPO, build_tokenizer, save_tiny_llama

from lora_sft import data, model
from lora_sft.cli.main import main
from lora_sft.model import planner, shapes
from lora_sft.recipe.load import load_recipe
from lora_sft.recipe.schema import Recipe
from lora_sft.settings import Machine, resolve
from lora_sft.tokens import IGNORE_INDEX

CUDA = Machine.target("cuda:24GiB")  # the GPU the planner tests plan for

pytestmark = pytest.mark.unit

LIBRARY = sorted((REPO / "recipes/library").glob("*.yaml"))
CONFIGS = REPO / "tests/data/model_configs"
ESTIMATE = re.compile(
    r"^# memory estimate: (?P<total>[\d.]+ [GM]iB) at micro batch (?P<micro>\d+), sequence (?P<sequence>\d+), "
    r"gradient checkpointing (?P<checkpointing>on|off)$",
    re.M,
)
# what a run may take of a GPU of each size (GB as GPU makers count them, GiB): 90%, the rest for the display,
# other programs and the driver
USABLE = {8: 0.9 * 8, 12: 0.9 * 12, 24: 0.9 * 24}
# model -> the GPU sizes it has a recipe for (the README's table): the 7-8B models do not fit 8 GB
PROMISED = {
    "llama-3.2-1b": (8, 12, 24),
    "llama-3.2-3b": (8, 12, 24),
    "llama-3.1-8b": (12, 24),
    "qwen2.5-0.5b": (8, 12, 24),
    "qwen2.5-1.5b": (8, 12, 24),
    "qwen2.5-7b": (12, 24),
    "qwen3-4b": (8, 12, 24),
    "qwen3-8b": (12, 24),
    "mistral-7b": (8, 12, 24),
    "gemma-2-2b": (8, 12, 24),
    "phi-3.5-mini": (8, 12, 24),
    "smollm2-1.7b": (8, 12, 24),
}
CLASSIFIERS = ("bert-base-classification.yaml", "modernbert-base-classification.yaml")


def _on_gpu(path: Path, *overrides: str) -> Recipe:
    # the estimate is for the GPU: bf16, which compute_dtype auto picks there
    return load_recipe(path, ["quant.compute_dtype=bf16", *overrides])


def estimate(recipe: Recipe) -> planner.Estimate:
    """The planner's peak for `recipe` on a CUDA GPU at its micro batch and checkpointing, rows of data.max_length."""
    shape, plan = shapes.known_shape(recipe.model.path), None
    if shape is None:  # an encoder: its module shapes from the published config.json
        folder = CONFIGS / recipe.model.path.replace("/", "--")
        local = recipe.model_copy(update={"model": recipe.model.model_copy(update={"path": str(folder)})})
        plan = model.plan_model(local, model.resolve_source(local), data.check(local).labels)
        shape = shapes.ModelShape.from_config(plan.config)
    work = planner.workload(resolve(recipe, CUDA), plan, shape, baseline=0)
    checkpointing = recipe.train.gradient_checkpointing
    assert isinstance(checkpointing, bool), "library recipes say on or off, so the estimate is the run's"
    return planner.estimate(resolve(recipe), work, recipe.train.micro_batch_size, checkpointing)


def _gpu(path: Path) -> int:
    m = re.search(r"-(\d+)gb\.yaml$", path.name)
    return int(m.group(1)) if m else 8  # the classifiers fit the smallest


def test_the_library_holds_every_promised_recipe_and_validate_sees_it():
    names = {p.name for p in LIBRARY}
    wanted = {f"{m}-{gb}gb.yaml" for m, sizes in PROMISED.items() for gb in sizes} | set(CLASSIFIERS)
    assert names == wanted
    assert set(LIBRARY) <= set(RECIPES)


# what `validate RECIPE --target cuda:NGiB` prints of its plan (a hub model offline: its shape from the table)
PLANNED = re.compile(
    r"memory estimate on the GPU: (?P<total>[\d.]+ [GM]iB) at micro batch (?P<micro>\d+), sequence (?P<sequence>\d+) "
    r"\(data\.max_length\), gradient checkpointing (?P<checkpointing>on|off)"
)
VERDICT = re.compile(
    r"verdict: (?P<verdict>fits|does NOT fit).* in GPU of --target (?P<target>\S+): (?P<available>[\d.]+ GiB) available"
)


def planned(path: Path, capsys) -> tuple[str, bool, str]:
    """(the estimate, whether it fits, what the GPU leaves a run) as `validate PATH --target cuda:NGiB` plans the
    recipe, N the GPU its name gives; an encoder (not in the table) as the planner plans it on its published config
    for that target, which validate does with the hub."""
    target = Machine.target(f"cuda:{_gpu(path)}GiB")
    assert target.memory is not None
    if path.name in CLASSIFIERS:
        total = estimate(_on_gpu(path)).total
        return planner.gib(total), total <= target.memory, planner.gib(target.memory)
    assert main(["validate", str(path.relative_to(REPO)), "--target", target.name]) == 0
    out = capsys.readouterr().out
    plan, verdict = PLANNED.search(out), VERDICT.search(out)
    assert plan and verdict and verdict["target"] == target.name, out
    return plan["total"], verdict["verdict"] == "fits", verdict["available"]


def header_source(path: Path, available: str) -> str:
    """The header's second estimate line: the command that prints the estimate, so a user reproduces it."""
    target = f"cuda:{_gpu(path)}GiB"
    how = (
        f"lora_sft's planner on the published config.json, as validate --target {target} plans it with the hub"
        if path.name in CLASSIFIERS
        else f"python -m lora_sft validate recipes/library/{path.name} --target {target}"
    )
    return f"#   ({how}: bf16, every row data.max_length long; the GPU leaves a run {available})"


@pytest.mark.parametrize("path", LIBRARY, ids=[p.name for p in LIBRARY])
def test_the_header_estimate_is_validate_on_its_target_and_fits_the_gpu(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the data paths are the repository's
    text = path.read_text()
    header = text[: text.index("\ntask:")]
    assert header.startswith("# ") and f"python -m lora_sft train recipes/library/{path.name}" in header
    assert "data: JSONL, one {" in header
    m = ESTIMATE.search(header)
    assert m, f"{path.name}: no '# memory estimate: ...' line"
    recipe = _on_gpu(path)
    said = (int(m["micro"]), int(m["sequence"]), m["checkpointing"] == "on")
    assert said == (recipe.train.micro_batch_size, recipe.data.max_length, recipe.train.gradient_checkpointing)
    total, fits, available = planned(path, capsys)
    source = header.split("\n")[header.split("\n").index(m.group(0)) + 1]
    if os.environ.get("LORA_SFT_REGENERATE"):
        estimate_line = m.group(0).replace(m["total"], total, 1)
        path.write_text(
            text.replace(f"{m.group(0)}\n{source}", f"{estimate_line}\n{header_source(path, available)}", 1)
        )
        return
    assert m["total"] == total, f"{path.name}: validate --target now says {total}"
    assert source == header_source(path, available)
    assert fits


@pytest.mark.parametrize("name", [m for m, sizes in PROMISED.items() if 8 not in sizes])
def test_the_sizes_left_out_do_not_fit(name, monkeypatch):
    """A 7-8B model on 8 GB: even one row of 512 tokens with checkpointing is over what the GPU leaves a run."""
    monkeypatch.chdir(REPO)
    smallest = _on_gpu(REPO / f"recipes/library/{name}-12gb.yaml", "data.max_length=512", "train.micro_batch_size=1")
    assert estimate(smallest).total > USABLE[8] * 2**30


def test_the_encoder_configs_are_the_published_ones():
    """The two encoder configs the estimates read, against the parameter counts their model cards give (the
    encoder alone: BERT-base 110M, ModernBERT-base 149M)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    for folder, millions in (("google-bert--bert-base-uncased", 110), ("answerdotai--ModernBERT-base", 149)):
        config = AutoConfig.for_model(**json.loads((CONFIGS / folder / "config.json").read_text()))
        with init_empty_weights():
            encoder = AutoModel.from_config(config)
        params = sum(p.numel() for p in encoder.parameters()) / 1e6
        assert abs(params - millions) / millions < 0.02, (folder, params)


def test_the_gemma_template_trains_the_turn_end_and_then_eos(tmp_path, monkeypatch):
    """The Gemma recipes' template on a stand-in for Gemma's tokenizer (its special tokens, eos_token <eos>): a row
    renders as Gemma's format, and the trained tokens are the response, <end_of_turn> and <eos>, which generation
    stops on."""
    monkeypatch.chdir(REPO)
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    corpus = (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()
    tokenizer = build_tokenizer(corpus, specials=specials, eos="<eos>", pad="<pad>", bos="<bos>", template=None)
    folder = save_tiny_llama(tmp_path / "gemma-like", tokenizer)
    recipe = load_recipe(REPO / "recipes/library/gemma-2-2b-8gb.yaml", [f"model.path={folder}", "data.eval_fraction=0"])
    tokenizer = model.load_tokenizer(recipe, model.resolve_source(recipe))
    checked = data.check(recipe)
    first = checked.train[0]
    bundle = data.build(recipe, tokenizer, checked)
    row = next(
        r for r in bundle.train if tokenizer.decode(r["input_ids"]).endswith(first.response + "<end_of_turn><eos>\n")
    )
    ids, labels = row["input_ids"], row["labels"]
    assert tokenizer.decode(ids) == (
        f"<bos><start_of_turn>user\n{first.chat[0]['content']}<end_of_turn>\n"
        f"<start_of_turn>model\n{first.response}<end_of_turn><eos>\n"
    )
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == f"{first.response}<end_of_turn><eos>"
    assert trained[-1] == tokenizer.eos_token_id
