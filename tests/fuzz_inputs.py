"""The fuzzer: random recipes, data rows, file names, command lines and environment variables, run through
`validate`, `preview` and a one-step `train` on a tiny random Llama, with one property:

    every input ends in exit 0 or 2, never 1; no traceback; exit 2 prints one `error: ...` line per problem and
    nothing else on stderr; on exit 2 nothing in the user's folder changed (byte for byte), and `validate` and
    `preview` never write there at all.

A case is a valid recipe for one of the five data formats, then a handful of mutations drawn by hypothesis: a key
of the schema set to a value of another type or out of range, an unknown key, a key removed, the YAML text itself
damaged (anchors, tabs, duplicate keys, bytes that are not UTF-8), KEY=VALUE overrides, rows with fields missing or
of the wrong type or huge, odd file names (a newline, a leading dash, bytes that are not UTF-8), and environment
variables lora_sft or its libraries read (LORA_SFT_CACHE, HF_HUB_OFFLINE, RANK, WORLD_SIZE, LOCAL_RANK, HF_HOME).

tests/test_fuzz.py runs a fixed-seed budget of it in the suite; benchmarks/fuzz.py runs as many as asked and prints
what it found, grouped. Cases run in-process through `lora_sft.cli.main.main`, as the bad-input corpus does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st
from pydantic import BaseModel

REPO = Path(__file__).resolve().parent.parent
FORMATS = ("alpaca", "prompt_completion", "messages", "text", "classification")
COMMANDS = ("validate", "preview", "train")
# what a command may print on stderr besides its errors (exit 2): nothing. On exit 0 anything goes but a traceback.
ERROR_LINE = re.compile(r"^error: \S.*$")
# stands for a 5,000-digit integer: Python refuses to print one (sys.int_info.str_digits_check_threshold), so it is
# drawn as this string and written out as digits where the case is written (JSON, CSV, YAML text)
BIG = "<5000 digits>"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters (a tab aside): a terminal acts on them
DIGITS = "9" * 5000


def _big(text: str) -> str:
    return text.replace(json.dumps(BIG), DIGITS).replace(BIG, DIGITS)


# --- values -----------------------------------------------------------------------------------------------------

_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from("\n\t\r {}[]:#&*!|>'\"%@`-,"),
    max_size=12,
)
_odd_strings = st.sampled_from(
    ["", " ", "\n", "null", "~", "yes", "1e400", "-0", "../..", "/", "a\nb", "\x00", "\u202e", "é" * 3, "x" * 300]
)
_ints = st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from([0, 1, -1, 2**31, 2**63]) | st.just(BIG)
_floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e-30, 1e30])
_scalars = st.none() | st.booleans() | _ints | _floats | _text | _odd_strings
values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)


def schema_paths() -> dict[str, Any]:
    """Every leaf key of the recipe schema, as a dotted path, with its annotation."""
    from lora_sft.recipe.schema import Recipe

    out: dict[str, Any] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = kind

    walk(Recipe, "")
    return out


def _in_domain(kind: Any) -> st.SearchStrategy:
    """A legal-looking value for a schema annotation: one of a Literal's choices, a bool, a small number."""
    text = repr(kind)
    options: list[st.SearchStrategy] = []
    if "Literal" in text:
        options.append(st.sampled_from(re.findall(r"'([^']*)'", text)))
    if "bool" in text:
        options.append(st.booleans())
    if "int" in text:
        options.append(st.integers(min_value=0, max_value=8))
    if "float" in text:
        options.append(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0]))
    if "None" in text or "Optional" in text:
        options.append(st.none())
    return st.one_of(options) if options else _text


# --- the parts of a case ----------------------------------------------------------------------------------------


@dataclass
class Case:
    """One input: what is written into the case's folder, then the command line and environment it runs with."""

    command: str
    recipe: dict
    recipe_text: bytes | None = None  # set: written as is instead of the recipe dumped as YAML
    overrides: list[str] = field(default_factory=list)
    data: dict[str, bytes] = field(default_factory=dict)  # file name (relative to the case folder) -> bytes
    env: dict[str, str] = field(default_factory=dict)  # values with {case} for the case folder
    args: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return json.dumps(
            {
                "command": self.command,
                "args": self.args,
                "overrides": self.overrides,
                "env": self.env,
                "data": {k: v[:300].decode("utf-8", "backslashreplace") for k, v in self.data.items()},
                "recipe": (self.recipe_text or b"").decode("utf-8", "backslashreplace")[:2000] or self.recipe,
            },
            default=repr,
            indent=1,
        )


def _row(fmt: str, label: str = "yes") -> dict:
    return {
        "alpaca": {"instruction": "Repeat the words.", "input": "tiger river", "output": "tiger river"},
        "prompt_completion": {"prompt": "Repeat: tiger river", "completion": " tiger river"},
        "messages": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Repeat: tiger river"},
                {"role": "assistant", "content": "tiger river"},
            ]
        },
        "text": {"text": "tiger river stone ocean candle"},
        "classification": {"text": "tiger river stone", "label": label},
    }[fmt]


@st.composite
def rows(draw, fmt: str, damaged: bool) -> list:
    """Rows of a format, all valid, or (damaged) some of them with a field gone, renamed, of another type, huge, odd."""
    out: list = [_row(fmt, label=("yes", "no")[i % 2]) for i in range(draw(st.integers(2, 10)))]
    for _ in range(draw(st.integers(1, 2)) if damaged else 0):
        i = draw(st.integers(0, len(out) - 1))
        row = out[i]
        how = draw(st.sampled_from(["drop", "rename", "value", "value", "not_a_row", "message", "extra"]))
        keys = list(row) if isinstance(row, dict) else []
        if how == "not_a_row" or not keys:
            out[i] = draw(values)
        elif how == "drop":
            row.pop(draw(st.sampled_from(keys)))
        elif how == "rename":
            row[draw(_text)] = row.pop(draw(st.sampled_from(keys)))
        elif how == "value":
            row[draw(st.sampled_from(keys))] = draw(values)
        elif how == "extra":
            row[draw(_text)] = draw(values)
        elif how == "message" and fmt == "messages" and isinstance(row.get("messages"), list) and row["messages"]:
            message = row["messages"][draw(st.integers(0, len(row["messages"]) - 1))]
            message[draw(st.sampled_from(["role", "content", "tool_calls", "name"]))] = draw(
                values | st.sampled_from(["user", "assistant", "system", "tool", "robot"])
            )
    return out


def encode_rows(rows_: list, suffix: str, draw, damaged: bool = False) -> bytes:
    """Rows as the bytes of a data file of that type (a .json array, .jsonl lines, CSV, text lines, parquet)."""
    suffix = suffix.lower()
    if suffix == ".json":
        return _big(json.dumps(rows_, default=repr)).encode()
    if suffix == ".txt":
        return "\n".join(str(r.get("text", r) if isinstance(r, dict) else r) for r in rows_).encode()
    if suffix == ".csv":
        import csv

        keys = sorted({k for r in rows_ if isinstance(r, dict) for k in r})
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(keys)
        for r in rows_:
            writer.writerow([r.get(k, "") if isinstance(r, dict) else r for k in keys])
        return _big(buf.getvalue()).encode()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        good = [r for r in rows_ if isinstance(r, dict)]
        try:
            table = pa.Table.from_pylist([{k: json.dumps(v, default=repr) for k, v in r.items()} for r in good])
        except Exception:  # pyarrow refuses the rows: write them as JSON lines under a .parquet name instead
            return encode_rows(rows_, ".jsonl", draw, damaged)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()
    lines = [_big(json.dumps(r, default=repr)) for r in rows_]
    if damaged and draw(st.booleans()):  # damage one line of the file itself
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = draw(st.sampled_from([lines[i][:-3], "", "{", "[1, 2]", "\ufeff" + lines[i], lines[i] + " x"]))
    return "\n".join(lines).encode()


_names = st.sampled_from(
    ["train", "my data", "-train", "#x", "a:b", "data\nfile", "名前", "x" * 120, "\udcff\udcfe", "UPPER", ".hidden"]
)


# what a case may change from a valid one: one to three of these (or nothing, a valid case, which must run)
DIMENSIONS = ("tweak", "break", "yaml", "overrides", "rows", "file", "names", "env")


@st.composite
def cases(draw, model: Path, commands: tuple[str, ...] = COMMANDS) -> Case:
    fmt = draw(st.sampled_from(FORMATS))
    command = draw(st.sampled_from(commands))
    changed = set(draw(st.lists(st.sampled_from(DIMENSIONS), max_size=draw(st.sampled_from([0, 1, 1, 2, 3])))))
    suffix = ".jsonl"
    if "file" in changed:
        suffix = draw(st.sampled_from([".json", ".csv", ".parquet", ".txt", ".JSONL"]))
    name = (draw(_names) if "names" in changed else "train") + suffix
    data = {name: encode_rows(draw(rows(fmt, "rows" in changed)), suffix, draw, "file" in changed)}
    recipe: dict = {
        "task": "classification" if fmt == "classification" else "causal_lm",
        "output_dir": "{case}/" + (draw(_names) if "names" in changed else "run"),
        "model": {"path": str(model)},
        "lora": {"rank": 2, "alpha": 4},
        "data": {"format": fmt, "train": "{case}/" + name, "max_length": 48},
        "train": {"max_steps": 1, "micro_batch_size": 2, "logging_steps": 1, "eval_before": False},
    }
    if fmt == "classification":
        recipe["data"]["labels"] = ["yes", "no"]
    paths = schema_paths()
    if "tweak" in changed:  # legal values off the beaten path: another init, packing, a quant mode, ...
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(sorted(paths)))
            _put(recipe, path, draw(_in_domain(paths[path])))
    if "break" in changed:
        how = draw(st.sampled_from(["set", "set", "unknown", "drop", "section"]))
        path = draw(st.sampled_from(sorted(paths)))
        if how == "set":
            _put(recipe, path, draw(values))
        elif how == "unknown":
            _put(recipe, path.rsplit(".", 1)[0] + "." + draw(_text) if "." in path else draw(_text), draw(values))
        elif how == "drop":
            _drop(recipe, path)
        else:
            recipe[draw(st.sampled_from(["model", "lora", "data", "train", "eval", "hub", "quant"]))] = draw(values)
    overrides = []
    if "overrides" in changed:
        keys = st.sampled_from(sorted(paths)) | _text
        texts = _text | st.sampled_from(["1", "-1", "[a, b]", "{", "true", "1e999", "null", "''"])
        overrides = [f"{draw(keys)}={draw(texts)}" for _ in range(draw(st.integers(1, 2)))]
    if command == "train":  # a one-step run, whatever the mutations say (the overrides come last and win)
        overrides += ["train.max_steps=1", "train.eval_steps=null", "eval.after_train=false", "hub.repo_id=null"]
    env: dict[str, str] = {}
    if "env" in changed:
        for _ in range(draw(st.integers(1, 2))):
            var = draw(
                st.sampled_from(["LORA_SFT_CACHE", "HF_HUB_OFFLINE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "HF_HOME"])
            )
            env[var] = draw(
                st.sampled_from(
                    ["", "0", "1", "two", "-1", "{case}/cache-dir", "{case}/" + name, "/proc/none/x", "1e3"]
                )
            )
    case = Case(command=command, recipe=recipe, overrides=overrides, data=data, env=env)
    if "yaml" in changed:
        case.recipe_text = _damage_yaml(draw, recipe)
    if command == "preview" and draw(st.booleans()):
        case.args = draw(st.sampled_from([["-n", "0"], ["--json"], ["--split", "eval"], ["-n", "99999"]]))
    return case


def _put(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[last] = value


def _drop(tree: dict, path: str) -> None:
    *parents, last = path.split(".")
    for key in parents:
        tree = tree.get(key) if isinstance(tree.get(key), dict) else {}
    tree.pop(last, None)


def _damage_yaml(draw, recipe: dict) -> bytes:
    text = _big(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    how = draw(st.sampled_from(["anchor", "recursive", "tab", "duplicate", "bytes", "top", "tag", "cut", "empty"]))
    if how == "anchor":
        return (text + "extra: &a {x: 1}\nother: *a\n").encode()
    if how == "recursive":
        return (text + "eval:\n  prompts: &p [*p]\n").encode()
    if how == "tab":
        return text.replace("  ", "\t", 1).encode()
    if how == "duplicate":
        return (text + "seed: 1\nseed: 2\n").encode()
    if how == "bytes":
        return text.encode() + b"\nseed: \xff\xfe\n"
    if how == "top":
        return draw(st.sampled_from([b"- a\n- b\n", b"just text\n", b"42\n", b"null\n"]))
    if how == "tag":
        return (text + "seed: !!python/object/apply:os.system ['true']\n").encode()
    if how == "cut":
        return text[: draw(st.integers(0, len(text)))].encode()
    return b""


# --- running one case -------------------------------------------------------------------------------------------


def _fill(value: Any, case_dir: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{case}", str(case_dir))
    if isinstance(value, dict):
        return {_fill(k, case_dir): _fill(v, case_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, case_dir) for v in value]
    return value


def _snapshot(root: Path, skip: Path | None) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[os.fsencode(p.relative_to(root))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    problems: list[str]  # what broke the property; empty: it held


def run_case(case: Case, case_dir: Path, cache: Path) -> Outcome:
    """Write the case into `case_dir` (emptied first), run it in-process, check the property."""
    from lora_sft.cli.main import main

    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    (case_dir / "notes.txt").write_text("a file of the user's\n")
    for name, body in case.data.items():
        (case_dir / name).write_bytes(body)
    recipe_path = case_dir / "recipe.yaml"
    if case.recipe_text is not None:
        recipe_path.write_bytes(case.recipe_text.replace(b"{case}", os.fsencode(case_dir)))
    else:
        recipe_path.write_text(_big(yaml.safe_dump(_fill(case.recipe, case_dir), sort_keys=False, allow_unicode=True)))
    env = {"LORA_SFT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **_fill(case.env, case_dir)}
    cache_dir = Path(env["LORA_SFT_CACHE"]) if env["LORA_SFT_CACHE"] else None
    fresh_cache = cache_dir == case_dir / "cache-dir"
    before = _snapshot(case_dir, cache_dir if fresh_cache else None)
    argv = [case.command, str(recipe_path), *[_fill(o, case_dir) for o in case.overrides], *case.args]
    # streams as a terminal's: stdout strict UTF-8 (a name that is not UTF-8 must not end the run), stderr as Python's
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    with _environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own exit (a usage error is 2)
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # anything main lets out is a finding
            code = -1
            err.write(f"main raised {type(e).__name__}: {e}\n")
    stdout, stderr = (s.buffer.getvalue().decode("utf-8", "backslashreplace") for s in (out, err))  # type: ignore[attr-defined]
    problems = []
    if code not in (0, 2):
        problems.append(f"exit {code}")
    if "Traceback (most recent call last)" in stdout + stderr:
        problems.append("a traceback")
    if code == 2:
        lines = [line for line in stderr.split("\n") if line.strip()]  # a terminal breaks lines at \n only
        stray = [line for line in lines if not ERROR_LINE.match(line) or CONTROL.search(line)]
        if not lines:
            problems.append("exit 2 without an error line")
        elif stray:
            problems.append(f"exit 2 with a line that is not `error: ...`: {stray[0][:200]!r}")
    if code == 2 or case.command in ("validate", "preview"):
        after = _snapshot(case_dir, cache_dir if fresh_cache else None)
        if after != before:
            changed = sorted(set(after) ^ set(before) | {k for k in before if k in after and after[k] != before[k]})
            problems.append(
                f"{case.command} exit {code} changed the user's folder: {', '.join(os.fsdecode(c) for c in changed[:4])}"
            )
    return Outcome(code, stdout, stderr, problems)


def summary_key(outcome: Outcome) -> str:
    """A finding's class: the broken property and the first error line with numbers, paths and quotes blurred."""
    first = next((line for line in outcome.stderr.splitlines() if line.startswith(("error:", "main raised"))), "")
    first = re.sub(r"/[^\s:'\"]+", "PATH", first)
    first = re.sub(r"\d+", "N", first)
    first = re.sub(r"'[^']*'", "'…'", first)
    return f"{'; '.join(p.split(':')[0] for p in outcome.problems)} | {first[:160]}"


__all__ = ["COMMANDS", "Case", "Outcome", "cases", "run_case", "summary_key"]
