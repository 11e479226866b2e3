"""Recipe errors: one line per problem naming file, line and key path; exit 2; no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO

from lora_sft.errors import UserError
from lora_sft.recipe.explain import explain
from lora_sft.recipe.load import load_recipe
from lora_sft.recipe.schema import Recipe

pytestmark = pytest.mark.unit

GOOD = """\
task: causal_lm
output_dir: {out}
model:
  path: {model}
lora:
  rank: 8
data:
  format: alpaca
  train: {data}
"""


@pytest.fixture
def good(tmp_path):
    return GOOD.format(out=tmp_path / "run", model=tmp_path, data=REPO / "data/examples/alpaca.jsonl")


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lora_sft", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=120,
    )


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_unknown_key_names_file_line_path_and_suggestion(tmp_path, good):
    path = write(tmp_path, good.replace("  rank: 8", "  rnak: 8"))
    assert_one_line_error(cli("validate", path), f"{path}:6: lora.rnak: unknown key (did you mean 'rank'?)")


def test_wrong_type(tmp_path, good):
    path = write(tmp_path, good.replace("  rank: 8", "  rank: eight"))
    assert_one_line_error(cli("validate", path), f"{path}:6: lora.rank:", "valid integer", "'eight'")


def test_out_of_range(tmp_path, good):
    path = write(tmp_path, good.replace("  rank: 8", "  rank: 0"))
    assert_one_line_error(cli("validate", path), f"{path}:6: lora.rank:", "greater than or equal to 1")


def test_bad_override_value(tmp_path, good):
    path = write(tmp_path, good)
    assert_one_line_error(cli("validate", path, "train.lr=fast"), "override 'train.lr=fast': train.lr:", "valid number")


def test_override_of_unknown_key(tmp_path, good):
    path = write(tmp_path, good)
    assert_one_line_error(
        cli("validate", path, "train.learning_rate=1e-4"),
        "override 'train.learning_rate=1e-4': train.learning_rate: unknown key (did you mean 'lr'?)",
    )


def test_override_without_equals(tmp_path, good):
    path = write(tmp_path, good)
    assert_one_line_error(cli("train", path, "train.lr"), "override 'train.lr': expected KEY=VALUE")


def test_train_reports_recipe_errors_before_writing_anything(tmp_path, good):
    path = write(tmp_path, good.replace("  rank: 8", "  rank: -3"))
    assert_one_line_error(cli("train", path), f"{path}:6: lora.rank:")
    assert not (tmp_path / "run").exists()


def test_all_problems_reported_at_once(tmp_path, good):
    path = write(
        tmp_path, good.replace("  rank: 8", "  rank: 0\n  dropuot: 0.1").replace("format: alpaca", "format: alpacca")
    )
    with pytest.raises(UserError) as e:
        load_recipe(path)
    problems = e.value.problems
    assert len(problems) == 3, problems
    assert any(p.startswith(f"{path}:6: lora.rank:") for p in problems)
    assert any(p.startswith(f"{path}:7: lora.dropuot: unknown key (did you mean 'dropout'?)") for p in problems)
    assert any(p.startswith(f"{path}:9: data.format:") and "'alpaca'" in p for p in problems)


def test_missing_required_key_and_cross_field_rules(tmp_path, good):
    path = write(tmp_path, good.replace("task: causal_lm\n", "task: classification\n"))
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert e.value.problems == [f"{path}:1: task: task classification needs data.format classification (got alpaca)"]
    path = write(tmp_path, good.replace("  format: alpaca\n", ""))
    with pytest.raises(
        UserError,
        match=r"r\.yaml:7: data: train\[0\] \(.*alpaca.jsonl\) has no format; set data.format or the source's format",
    ):
        load_recipe(path)
    path = write(tmp_path, good + "  eval: x.jsonl\n  eval_fraction: 0.1\n")
    with pytest.raises(UserError, match=r"r\.yaml:7: data: set either eval"):
        load_recipe(path)


def test_yaml_syntax_and_duplicate_keys(tmp_path, good):
    with pytest.raises(UserError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(write(tmp_path, good + "  - broken: [\n"))
    with pytest.raises(UserError, match=r"r\.yaml:7: lora.rank: duplicate key \(first at line 6\)"):
        load_recipe(write(tmp_path, good.replace("  rank: 8", "  rank: 8\n  rank: 16")))


def test_defaults_live_in_the_schema_and_overrides_are_typed(tmp_path, good):
    recipe = load_recipe(
        write(tmp_path, good), ["train.lr=1e-4", "lora.target_modules=[q_proj, v_proj]", "quant.mode=fp4"]
    )
    assert recipe.train.lr == 1e-4 and recipe.lora.target_modules == ["q_proj", "v_proj"] and recipe.quant.mode == "fp4"
    assert (
        recipe.quant.double_quant is True
        and recipe.train.gradient_checkpointing == "auto"  # issue 9: the planner decides
        and recipe.model.trust_remote_code is False
    )
    resolved = recipe.resolved_dict()
    assert Recipe.model_validate(resolved).resolved_dict() == resolved


def test_every_field_is_documented_and_the_readme_table_is_current():
    rows = explain().splitlines()[2:]
    assert any(r.startswith("| `lora.rank` | `16` |") for r in rows) and any(
        r.startswith("| `data.train` | required |") for r in rows
    )
    for row in rows:
        assert row.rsplit("|", 2)[1].strip(), f"undocumented: {row}"
    readme = (REPO / "README.md").read_text()
    assert explain() in readme, (
        "README's recipe table drifted: paste `python -m lora_sft validate --explain` output into it"
    )


def test_version_and_help():
    from lora_sft import __version__

    assert cli("--version").stdout.strip() == f"lora_sft {__version__}"
    for command in ("train", "validate"):
        out = cli(command, "--help")
        assert out.returncode == 0 and "KEY=VALUE" in out.stdout


# ---------------------------------------------------------------- issue 15: values read as meant, hostile YAML


def _problems(path, overrides=()) -> list[str]:
    with pytest.raises(UserError) as e:
        load_recipe(path, list(overrides))
    return e.value.problems


def test_no_infinite_or_nan_number_anywhere(tmp_path, good):
    path = write(
        tmp_path,
        good.replace("  rank: 8", "  rank: 8\n  alpha: .inf\n  dropout: .nan")
        + "train:\n  warmup: .inf\n  lr: -.inf\n",
    )
    assert _problems(path) == [
        f"{path}:7: lora.alpha: input should be a finite number (got inf)",
        f"{path}:8: lora.dropout: input should be a finite number (got nan)",
        f"{path}:14: train.lr: input should be a finite number (got -inf)",
        f"{path}:13: train.warmup: input should be a finite number (got inf)",
    ]
    assert _problems(write(tmp_path, good), ["data.eval_fraction=.nan"]) == [
        "override 'data.eval_fraction=.nan': data.eval_fraction: input should be a finite number (got nan)"
    ]


def test_booleans_are_not_integers_and_integers_are_not_booleans(tmp_path, good):
    path = write(
        tmp_path,
        good.replace("  rank: 8", "  rank: yes\n  rslora: 1\n  layers: [0, no]")
        + "train:\n  epochs: true\n  max_steps: 10.0\n",
    )
    assert _problems(path) == [
        f"{path}:6: lora.rank: input should be a valid integer (got True)",
        f"{path}:8: lora.layers.1: input should be a valid integer (got False)",
        f"{path}:7: lora.rslora: input should be a valid boolean (got 1)",
        f"{path}:13: train.epochs: input should be a number, not a yes/no value (got true)",
        f"{path}:14: train.max_steps: input should be a valid integer (got 10.0)",
    ]
    # floats stay lax where YAML gives a string: `2e-4` has no dot, so YAML reads it as text
    recipe = load_recipe(
        write(tmp_path, good + "train:\n  lr: 2e-4\n  epochs: 2\n"), ["lora.dropout=0", "train.warmup=1e-2"]
    )
    assert (recipe.train.lr, recipe.train.epochs, recipe.lora.dropout, recipe.train.warmup) == (2e-4, 2.0, 0.0, 0.01)
    assert load_recipe(write(tmp_path, good), ["lora.dora=yes", "lora.rank=4"]).lora.model_dump(
        include={"dora", "rank"}
    ) == {"dora": True, "rank": 4}


def test_seed_range(tmp_path, good):
    for seed in (-1, 2**32):
        assert _problems(write(tmp_path, good + f"seed: {seed}\n")) == [
            f"{tmp_path / 'r.yaml'}:10: seed: must be between 0 and 4294967295 (got {seed})"
        ]
    for seed in (0, 2**32 - 1):
        assert load_recipe(write(tmp_path, good + f"seed: {seed}\n")).seed == seed


def test_huge_numbers_are_one_line(tmp_path, good):
    path = write(tmp_path, good + "seed: " + "9" * 5000 + "\n")
    assert _problems(path) == [f"{path}:10: a number of 5000 digits; no recipe value needs more than a few"]
    # an override's value is parsed on its own: too long for an int, it stays text, which the schema refuses
    [line] = _problems(write(tmp_path, good), ["lora.rank=" + "7" * 5000])
    assert (
        line
        == f"override 'lora.rank={'7' * 50}... (5010 characters)': lora.rank: input should be a valid integer (got '{'7' * 39}... (5002 characters))"
    )


def test_alias_bomb_is_refused_quickly_but_anchors_still_work(tmp_path, good):
    bomb = good + 'x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    bomb += "".join(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]\n" for i in range(1, 10))  # 10**10 values
    path = write(tmp_path, bomb)
    assert _problems(path) == [
        f"{path}: YAML anchors and aliases expand to more than 100,000 values (an alias bomb?); write the recipe without them"
    ]
    shared = good.replace("  rank: 8", "  rank: &r 8\n  alpha: *r").replace("data:\n", "data: &d\n")
    recipe = load_recipe(write(tmp_path, shared))
    assert (recipe.lora.rank, recipe.lora.alpha) == (8, 8.0)


def test_deep_nesting_is_one_line(tmp_path, good):
    for deep in ("[" * 5000 + "]" * 5000, "{a: " * 5000 + "1" + "}" * 5000):
        path = write(tmp_path, good + f"lora_extra: {deep}\n")
        assert _problems(path) == [f"{path}: nested too deeply to be a recipe (sections hold keys, a few levels deep)"]
    proc = cli("validate", path)
    assert (
        proc.returncode == 2
        and proc.stderr == f"error: {path}: nested too deeply to be a recipe (sections hold keys, a few levels deep)\n"
    )


def test_flat_axolotl_and_trl_keys_point_to_ours(tmp_path, good):
    flat = (
        good
        + "learning_rate: 2.0e-4\nlora_r: 16\nlora_alpha: 32\nlora_dropout: 0.05\nlora_target_modules: [q_proj]\nsequence_len: 2048\n"
    )
    flat += "micro_batch_size: 2\ngradient_accumulation_steps: 4\nnum_epochs: 3\nbase_model: x\nbf16: auto\nload_in_4bit: true\n"
    flat += "sample_packing: true\nval_set_size: 0.05\ndatasets: []\nwarmup_steps: 10\nlr_scheduler: cosine\noptimizer: adamw_torch\nrevision: main\n"
    path = write(tmp_path, flat)
    hints = [p.split(": ", 2)[2] for p in _problems(path)]
    assert hints == [
        "unknown key (ours is train.lr)",
        "unknown key (ours is lora.rank)",
        "unknown key (ours is lora.alpha)",
        "unknown key (ours is lora.dropout)",
        "unknown key (ours is lora.target_modules)",
        "unknown key (ours is data.max_length)",
        "unknown key (ours is train.micro_batch_size)",
        "unknown key (ours is train.grad_accum)",
        "unknown key (ours is train.epochs)",
        "unknown key (ours is model.path)",
        "unknown key (no such switch; set quant.compute_dtype: bf16)",
        "unknown key (no such switch; set quant.mode: nf4 (the default))",
        "unknown key (ours is data.packing)",
        "unknown key (ours is data.eval_fraction)",
        "unknown key (ours is data.train)",
        "unknown key (ours is train.warmup)",
        "unknown key (ours is train.scheduler)",
        "unknown key (ours is train.optimizer)",
        # in two sections (model, hub): no single pointer, so the section names
        "unknown key (known keys: task, output_dir, seed, model, quant, lora, data, train, eval, hub)",
    ]
    # inside a section the did-you-mean stays
    assert _problems(write(tmp_path, good.replace("  rank: 8", "  lora_r: 8"))) == [
        f"{tmp_path / 'r.yaml'}:6: lora.lora_r: unknown key (did you mean 'rank'?)"
    ]


def test_llama_factory_and_option_names_point_to_ours(tmp_path, good):
    """The names of the README's mapping table, flat and inside their section."""
    flat = (
        good
        + "cutoff_len: 512\nlora_rank: 8\nlora_target: all\nval_size: 0.1\ntemplate: chatml\ntrain_on_prompt: true\n"
    )
    flat += "new_special_tokens: [a]\nneftune_noise_alpha: 5\nloraplus_lr_ratio: 16\nearly_stopping_patience: 3\n"
    flat += "init_lora_weights: loftq\nquantization_bit: 4\n"
    hints = [p.split(": ", 2)[2] for p in _problems(write(tmp_path, flat))]
    assert hints == [
        "unknown key (ours is data.max_length)",
        "unknown key (ours is lora.rank)",
        "unknown key (ours is lora.target_modules)",
        "unknown key (ours is data.eval_fraction)",
        "unknown key (ours is data.chat_template)",
        "unknown key (ours is data.train_on_inputs)",
        "unknown key (ours is data.add_special_tokens)",
        "unknown key (ours is train.neftune_alpha)",
        "unknown key (ours is train.lora_plus_ratio)",
        "unknown key (ours is train.early_stopping.patience)",
        "unknown key (ours is lora.init)",
        "unknown key (no such switch; set quant.mode: nf4 (4 bits, the default) or int8 (8 bits))",
    ]
    nested = good.replace("  rank: 8", "  lora_rank: 8")
    assert _problems(write(tmp_path, nested)) == [
        f"{tmp_path / 'r.yaml'}:6: lora.lora_rank: unknown key (did you mean 'rank'?)"
    ]
