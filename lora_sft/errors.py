"""Errors a person can act on.

`UserError` is bad input (a recipe, an override, a data file, a model path): the CLI prints each of
its problems as one line and exits 2. Anything else that goes wrong is a failure of the run
(exit 1). Neither prints a traceback unless `--debug` is given.
"""

from __future__ import annotations


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
