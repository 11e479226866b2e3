"""A check in a child interpreter: llama.cpp is native code, and a crash there (an instruction the CPU or VM does not
allow, say) must fail the check, not kill the export before it removes its staging folder."""

from __future__ import annotations

import re
from pathlib import Path


def in_child(module: str, function: str, job: Path, quoted: str) -> str | None:
    """Run `module.function(job)` in a child interpreter with this lora_sft on its path (llama.cpp is native code: a
    crash there must fail a check, not the export). None when it succeeded, else how it ended and the last stderr
    line matching the regex `quoted`: "SIGILL" or "exit 1: ValueError: ..."."""
    import signal
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {root!r}); from {module} import {function}; {function}(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    how = signal.Signals(-proc.returncode).name if proc.returncode < 0 else f"exit {proc.returncode}"
    last = [line for line in proc.stderr.splitlines() if re.search(quoted, line, re.IGNORECASE)][-1:]
    return f"{how}{': ' + last[0] if last else ''}"
