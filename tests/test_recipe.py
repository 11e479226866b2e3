"""Recipe errors: one line per problem naming file, line and key path; exit 2; no traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from lora_sft.errors import UserError
from lora_sft.recipe import Recipe, explain, load_recipe

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
    return subprocess.run([sys.executable, "-m", "lora_sft", *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO, timeout=120)


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
    assert_one_line_error(cli("validate", path, "train.learning_rate=1e-4"), "override 'train.learning_rate=1e-4': train.learning_rate: unknown key (did you mean 'lr'?)")


def test_override_without_equals(tmp_path, good):
    path = write(tmp_path, good)
    assert_one_line_error(cli("train", path, "train.lr"), "override 'train.lr': expected KEY=VALUE")


def test_train_reports_recipe_errors_before_writing_anything(tmp_path, good):
    path = write(tmp_path, good.replace("  rank: 8", "  rank: -3"))
    assert_one_line_error(cli("train", path), f"{path}:6: lora.rank:")
    assert not (tmp_path / "run").exists()


def test_all_problems_reported_at_once(tmp_path, good):
    path = write(tmp_path, good.replace("  rank: 8", "  rank: 0\n  dropuot: 0.1").replace("format: alpaca", "format: alpacca"))
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
    with pytest.raises(UserError, match=r"r\.yaml:7: data: train\[0\] \(.*alpaca.jsonl\) has no format; set data.format or the source's format"):
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
    recipe = load_recipe(write(tmp_path, good), ["train.lr=1e-4", "lora.target_modules=[q_proj, v_proj]", "quant.mode=fp4"])
    assert recipe.train.lr == 1e-4 and recipe.lora.target_modules == ["q_proj", "v_proj"] and recipe.quant.mode == "fp4"
    assert recipe.quant.double_quant is True and recipe.train.gradient_checkpointing is True and recipe.model.trust_remote_code is False
    resolved = recipe.resolved_dict()
    assert Recipe.model_validate(resolved).resolved_dict() == resolved


def test_every_field_is_documented_and_the_readme_table_is_current():
    rows = explain().splitlines()[2:]
    assert any(r.startswith("| `lora.rank` | `16` |") for r in rows) and any(r.startswith("| `data.train` | required |") for r in rows)
    for row in rows:
        assert row.rsplit("|", 2)[1].strip(), f"undocumented: {row}"
    readme = (REPO / "README.md").read_text()
    assert explain() in readme, "README's recipe table drifted: paste `python -m lora_sft validate --explain` output into it"


def test_version_and_help():
    from lora_sft import __version__

    assert cli("--version").stdout.strip() == f"lora_sft {__version__}"
    for command in ("train", "validate"):
        out = cli(command, "--help")
        assert out.returncode == 0 and "KEY=VALUE" in out.stdout
