"""The argparse pieces every command module shares: the parser that reports a mistake in one line, and the types
that check a number or a size on the command line."""

from __future__ import annotations

import argparse
import math

from lora_sft.errors import UserError


class ArgumentError(Exception):
    """A command-line mistake: printed as one `error: ...` line, exit 2 (argparse would print its usage block)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ArgumentError(f"{self.prog}: {message} (see {self.prog} --help)")


def count(least: int):
    """An argparse type: an integer of at least `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is too small; give {least} or more")
        return value

    return parse


def tolerance(text: str) -> float:
    """An argparse type: a finite max |logit diff| of 0 or more (nan or inf would switch the check off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a tolerance; give a finite number of 0 or more, e.g. 1e-4")
    return value


def shard_size(text: str) -> int:
    """An argparse type: a shard size in bytes, or with a unit (200KB, 2GB, 500MiB), above 0."""
    from lora_sft.export.options import shard_bytes

    try:
        return shard_bytes(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(e.problems[0].split(": ", 1)[1]) from None


def target(text: str):
    """An argparse type: the machine `validate --target` plans for (`lora_sft.settings.Machine.target`)."""
    from lora_sft.settings import TARGETS, Machine

    try:
        return Machine.target(text)
    except UserError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a machine lora_sft can plan for; use one of {TARGETS}"
        ) from None
