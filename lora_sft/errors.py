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
