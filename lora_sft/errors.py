"""Errors a person can act on.

`UserError` is bad input (a recipe, an override, a data file, a model path): the CLI prints each of
its problems as one line and exits 2. Anything else that goes wrong is a failure of the run
(exit 1). Neither prints a traceback unless `--debug` is given.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """One or more problems with the user's input, each a ready-to-print line."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class RunError(Exception):
    """The run failed or stopped in a way the person can act on (a full disk, a diverging loss, out of
    memory, an interrupt): the CLI prints the message as one line, with no traceback, and exits `code`."""

    def __init__(self, message: str, code: int = 1):
        self.code = code
        super().__init__(message)


def printable(text: str) -> str:
    """`text` with every character that would not print as itself (a newline, a tab, a byte of a file name that is
    not UTF-8) written as Python escapes it (\\n, \\t, \\udcff): an error stays one line, whatever it names."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(name: str | os.PathLike[str]) -> str:
    """A name the user gave (a path, a key) as a message shows it: as it is when it prints as itself, else quoted
    with its odd characters escaped (`'a\\nb.jsonl'`), so the line says which name it means."""
    text = os.fspath(name)
    return text if text.isprintable() else repr(text)


def one_line(message: object) -> str:
    """A library's message (pyarrow's, datasets') that may run over several lines, as one: its lines joined with
    '; ', blank ones and runs of spaces dropped."""
    parts = (" ".join(line.split()) for line in str(message).splitlines())
    return "; ".join(p for p in parts if p)
