"""Errors a person can act on.

`UserError` is bad input (a recipe, an override, a data file, a model path): the CLI prints each of
its problems as one line and exits 2. Anything else that goes wrong is a failure of the run
(exit 1). Neither prints a traceback unless `--debug` is given.
"""

from __future__ import annotations

import re

# what a terminal acts on: a line break (\n, \r) would split one problem over lines, an escape would recolour or move
# the cursor; a tab is only a space
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` as one printable line: control characters (a newline in a file name, pyarrow's multi-line message)
    written as escapes (`\\n`, `\\x1b`), the way repr() writes them."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


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
