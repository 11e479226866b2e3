"""Where each key of a recipe came from, for error messages: a line of the YAML file, or a command-line override."""

from __future__ import annotations


class RecipeSource:
    """Where each key of a recipe came from: a line of the YAML file, or a command-line override."""

    def __init__(self, file: str, lines: dict[tuple, int], overrides: dict[tuple, str]):
        self.file, self.lines, self.overrides = file, lines, overrides

    def where(self, path: tuple) -> str:
        dotted = ".".join(str(p) for p in path)
        for key, text in self.overrides.items():
            if path and key[: len(path)] == path:  # `seed.x=1` made a section of `seed`: the override is to blame
                return f"override '{_short(text)}': {dotted}"
        for n in range(len(path), -1, -1):
            if path[:n] in self.overrides:
                return f"override '{_short(self.overrides[path[:n]])}': {dotted}"
            if path[:n] in self.lines:
                return f"{self.file}:{self.lines[path[:n]]}: {dotted}"
        return f"{self.file}: {dotted}"


def _short(text: str) -> str:
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
