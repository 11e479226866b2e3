"""Loading a recipe: YAML with its line numbers kept, `KEY=VALUE` overrides, then validation.

The YAML file is parsed with its line numbers kept, `KEY=VALUE` overrides patch the raw mapping (so they get
the same checks and messages), and the result is validated by the schema. Every problem is reported at once,
one line each, as `file:line: key.path: what is wrong`. A document that expands without bound and a Hugging
Face token written into the recipe are refused before validation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_sft.errors import UserError, shown
from lora_sft.paths import is_utf8, not_a_file
from lora_sft.recipe.aliases import describe
from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.source import RecipeSource


def _line_map(node: yaml.Node, file: str, prefix: tuple = ()) -> dict[tuple, int]:
    """Key path -> 1-based line for every mapping key; duplicate keys are errors."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, key.value)
            if path in lines:
                raise UserError(
                    f"{file}:{key.start_mark.line + 1}: {'.'.join(map(str, path))}: duplicate key (first at line {lines[path]})"
                )
            lines[path] = key.start_mark.line + 1
            lines.update(_line_map(value, file, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            item_path = (*prefix, i)
            lines[item_path] = item.start_mark.line + 1
            lines.update(_line_map(item, file, item_path))
    return lines


def _apply_override(raw: dict, text: str, overrides: dict[tuple, str]) -> None:
    if "=" not in text:
        raise UserError(f"override '{text}': expected KEY=VALUE, e.g. train.lr=1e-4")
    key, value = text.split("=", 1)
    path = tuple(key.strip().split("."))
    if not all(path):
        raise UserError(f"override '{text}': empty key name in '{key}'")
    try:
        # `k=&a [*a]` holds itself; a long number is kept as text, and the schema says what is wrong with it
        _refuse_blowups(yaml.compose(value), f"override '{text}'", digits=False)
        parsed = yaml.safe_load(value) if value.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an int of more than 4300 digits
        parsed = value
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override '{text}': {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = parsed
    overrides[path] = text


# A Hugging Face access token (user or fine-grained): it would land in recipe.yaml, the model card, logs.
SECRET = re.compile(r"hf_[A-Za-z0-9]{30,}")


def _refuse_secrets(node: Any, source: RecipeSource, path: tuple = ()) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_secrets(value, source, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_secrets(value, source, (*path, i))
    elif isinstance(node, str) and SECRET.search(node):
        where = SECRET.sub("hf_***", source.where(path))  # an override's text holds the token itself
        raise UserError(
            f"{where}: looks like a Hugging Face token; never write tokens into a recipe (it is copied into the run directory): export HF_TOKEN=... instead"
        )
    elif isinstance(node, str) and not is_utf8(node):  # an override from a command line that is not UTF-8
        raise UserError(
            f"{source.where(path)}: {shown(node)} is not valid UTF-8 text; write it in UTF-8 (a run stores its recipe as UTF-8)"
        )


# A recipe has a few hundred values at most; YAML anchors can make a short file expand without bound
# ("billion laughs"), and everything that walks the result would hang.
MAX_VALUES = 100_000
MAX_DIGITS = 100  # Python refuses to read ints of over 4300 digits; no recipe value needs more than a few


def _refuse_blowups(root: yaml.Node | None, file: str, digits: bool = True) -> None:
    """Refuse a document whose aliases expand beyond MAX_VALUES values or make a value contain itself, or (with
    `digits`) a number too long to be meant."""
    sizes: dict[int, int] = {}
    inside: set[int] = set()  # the nodes being walked: an alias to one of them makes the value contain itself

    def size(node: yaml.Node) -> int:
        if id(node) in inside:
            raise UserError(
                f"{file}:{node.start_mark.line + 1}: a YAML alias inside the anchor it names (a value that contains itself); write the value out"
            )
        if id(node) in sizes:  # an alias is the same node object again: counted in full, walked once
            return sizes[id(node)]
        if isinstance(node, yaml.ScalarNode):
            if digits and node.tag.endswith((":int", ":float")) and len(node.value) > MAX_DIGITS:
                raise UserError(
                    f"{file}:{node.start_mark.line + 1}: a number of {len(node.value)} digits; no recipe value needs more than a few"
                )
            return 1
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        inside.add(id(node))
        total = 1 + sum(size(c) for c in children)
        inside.discard(id(node))
        sizes[id(node)] = total
        return total

    if root is not None and size(root) > MAX_VALUES:
        raise UserError(
            f"{file}: YAML anchors and aliases expand to more than {MAX_VALUES:,} values (an alias bomb?); write the recipe without them"
        )


def load_recipe(file: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, patch and validate a recipe; raises UserError with every problem found."""
    file = str(file)
    if not is_utf8(file):
        raise UserError(f"{shown(file)}: the recipe's file name is not valid UTF-8; rename it")
    if (kind := not_a_file(Path(file))) is not None:
        raise UserError(f"{file}: the recipe is {kind}, not a file; write it to a file and name that")
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{file}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: cannot read the recipe ({e})") from None
    try:
        node = yaml.compose(text)
        _refuse_blowups(node, file)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{file}{line}: invalid YAML: {problem}") from None
    except RecursionError:
        raise UserError(f"{file}: nested too deeply to be a recipe (sections hold keys, a few levels deep)") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{file}:1: a recipe is a mapping of sections (task, model, data, ...), not a {type(raw).__name__}"
        )
    lines = _line_map(node, file) if node is not None else {}
    applied: dict[tuple, str] = {}
    for text_override in overrides:
        _apply_override(raw, text_override, applied)
    source = RecipeSource(file, lines, applied)
    _refuse_secrets(raw, source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems: dict[tuple, list[str]] = {}
        alternatives: set[tuple] = set()
        for err in map(dict, e.errors()):  # plain dicts: `describe` marks union alternatives on them
            path, msg = describe(err, raw)
            problems.setdefault(path, []).append(msg)
            if err.get("_union_alternative"):
                alternatives.add(path)
        # A value that fits one form of a union but has errors inside: report those, not "not a string".
        for path in alternatives:
            if any(len(other) > len(path) and other[: len(path)] == path for other in problems):
                problems.pop(path, None)
        raise UserError(
            [f"{source.where(path)}: {' or '.join(dict.fromkeys(msgs))}" for path, msgs in problems.items()]
        ) from None
    recipe._source = source
    return recipe
