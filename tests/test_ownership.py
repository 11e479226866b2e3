"""The ownership rule (run/files.py): a command that replaces what it wrote before replaces only that.

A marked folder written again keeps every file lora_sft did not write, at any depth, and refuses (one line,
nothing changed) a new file whose place holds one; a failure at any point leaves the folder as it was. The commands
that use it (export, plot, train's removal of a stale export) are tested through the CLI in test_export.py,
test_plots.py and test_rundir_safety.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lora_sft.errors import UserError
from lora_sft.run.files import check_replaceable, holds_mark, mark_text
from lora_sft.run.rundir import EXPORT_MARKER, ExportDir

pytestmark = pytest.mark.unit


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def export_once(out: Path, files: dict[str, str]) -> None:
    """What an export does: the marker first, then its files, into the staging folder."""
    with ExportDir(out).owned().staged(f"--out {out}", "give --out a new folder") as staging:
        ExportDir(staging).mark(out)
        for rel, text in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(text)


FIRST = {"adapter/adapter_config.json": "1", "merged/model.safetensors": "1", "fidelity.json": "1"}
SECOND = {"adapter/adapter_config.json": "2", "adapter/README.md": "2", "fidelity.json": "2"}


def test_a_second_write_replaces_only_what_the_first_wrote(tmp_path):
    out = tmp_path / "out"
    export_once(out, FIRST)
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["files"] == sorted(FIRST)
    (out / "notes.md").write_text("mine")
    (out / "adapter" / "my-eval.txt").write_text("mine too")
    (out / "merged" / "keep.txt").write_text("and this")
    export_once(out, SECOND)
    assert snapshot(out) == {
        EXPORT_MARKER: (out / EXPORT_MARKER).read_bytes(),
        "adapter": None,
        "adapter/README.md": b"2",
        "adapter/adapter_config.json": b"2",
        "adapter/my-eval.txt": b"mine too",
        "fidelity.json": b"2",
        "merged": None,  # the first export's model is gone, the folder stays for the user's file in it
        "merged/keep.txt": b"and this",
        "notes.md": b"mine",
    }
    assert json.loads((out / EXPORT_MARKER).read_text())["files"] == sorted(SECOND)
    export_once(out, FIRST)  # and back: no staging or set-aside folder is left
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_MARKER, "adapter", "fidelity.json", "merged", "notes.md"]


def test_a_stale_folder_of_ours_is_removed_when_it_ends_empty(tmp_path):
    out = tmp_path / "out"
    export_once(out, FIRST)
    export_once(out, SECOND)
    assert not (out / "merged").exists()


def test_a_new_file_where_the_user_has_one_is_refused_and_nothing_changes(tmp_path):
    out = tmp_path / "out"
    export_once(out, SECOND)
    (out / "merged").mkdir()
    (out / "merged" / "model.safetensors").write_text("the user's own")
    before = snapshot(out)
    with pytest.raises(UserError) as refused:
        export_once(out, FIRST)
    assert refused.value.problems == [
        f"--out {out}: {out / 'merged/model.safetensors'} is in the way: lora_sft did not write it and would replace it; give --out a new folder"
    ]
    assert snapshot(out) == before


def test_a_users_file_where_a_folder_of_ours_goes_is_refused(tmp_path):
    out = tmp_path / "out"
    export_once(out, SECOND)
    (out / "merged").write_text("a file named like the folder")
    before = snapshot(out)
    with pytest.raises(UserError, match=r"merged/model\.safetensors is in the way"):
        export_once(out, FIRST)
    assert snapshot(out) == before


def test_a_failure_in_the_block_leaves_the_folder_and_its_parents_as_they_were(tmp_path):
    out = tmp_path / "out"
    export_once(out, FIRST)
    (out / "notes.md").write_text("mine")
    before = snapshot(out)
    with pytest.raises(RuntimeError), ExportDir(out).owned().staged("--out", "fix") as staging:
        ExportDir(staging).mark(out)
        (staging / "fidelity.json").write_text("half")
        raise RuntimeError("a check failed")
    assert snapshot(out) == before
    with pytest.raises(RuntimeError), ExportDir(tmp_path / "a" / "b").owned().staged("--out", "fix"):
        raise RuntimeError("a check failed")
    assert not (tmp_path / "a").exists()


def test_a_failure_half_way_through_the_swap_puts_the_old_files_back(tmp_path, monkeypatch):
    """The renames run on the real file system; the one that fails is made to (a full disk or a yanked mount would
    do it, which a test cannot arrange): every point of the swap is tried."""
    out = tmp_path / "out"
    export_once(out, FIRST)
    (out / "notes.md").write_text("mine")
    before = snapshot(out)
    real = os.replace
    fail_at, succeeded = 0, False
    while not succeeded:  # the 1st rename fails, then the 2nd, ... until there are no more to fail
        fail_at += 1
        calls: list[str] = []

        def replace(src, dst, fail_at=fail_at, calls=calls):
            calls.append(src)
            if len(calls) == fail_at:
                raise OSError(28, "No space left on device")
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            export_once(out, SECOND)
            succeeded = True
        except OSError:
            assert snapshot(out) == before, f"rename {fail_at} failed"
        finally:
            monkeypatch.setattr(os, "replace", real)
    assert fail_at == 11  # the marker written, listed, claimed in place; 3 files out, 3 in; the marker in; then none
    assert (out / "notes.md").read_text() == "mine" and (out / "fidelity.json").read_text() == "2"


def test_an_export_from_before_the_list_owns_the_names_an_export_writes(tmp_path):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("old")
    (out / "fidelity.json").write_text(json.dumps({"pairs": {}, "run_dir": "r"}))  # an export before the marker
    (out / "notes.md").write_text("mine")
    assert ExportDir(out).is_export()
    assert ExportDir(out).owned().written() == {"adapter/adapter_config.json", "fidelity.json"}
    export_once(out, {"adapter/adapter_config.json": "new", "fidelity.json": "new"})
    assert sorted(snapshot(out)) == [
        EXPORT_MARKER,
        "adapter",
        "adapter/adapter_config.json",
        "fidelity.json",
        "notes.md",
    ]
    assert (out / "notes.md").read_text() == "mine" and (out / "fidelity.json").read_text() == "new"


def test_a_marker_that_names_a_file_outside_the_folder_is_not_followed(tmp_path):
    out = tmp_path / "out"
    export_once(out, SECOND)
    outside = tmp_path / "outside.txt"
    outside.write_text("not in the export")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x").write_text("through a link")
    (out / "linked").symlink_to(tmp_path / "elsewhere")
    marker = json.loads((out / EXPORT_MARKER).read_text())
    marker["files"] += ["../outside.txt", str(outside), "linked/x"]
    (out / EXPORT_MARKER).write_text(json.dumps(marker))
    ExportDir(out).owned().remove()
    assert outside.read_text() == "not in the export" and (tmp_path / "elsewhere" / "x").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["linked"]


def test_remove_keeps_the_users_files_and_the_folder_that_holds_them(tmp_path):
    out = tmp_path / "out"
    export_once(out, FIRST)
    (out / "adapter" / "mine.txt").write_text("mine")
    ExportDir(out).owned().remove()
    assert snapshot(out) == {"adapter": None, "adapter/mine.txt": b"mine"}
    (out / "adapter" / "mine.txt").unlink()
    export_once(out, FIRST)
    ExportDir(out).owned().remove()
    assert not out.exists()


def test_a_file_is_replaced_only_when_it_carries_the_commands_mark(tmp_path):
    theirs, ours = tmp_path / "figure.png", tmp_path / "plot.svg"
    theirs.write_bytes(b"\x89PNG a figure of the user's")
    ours.write_text(f"<svg><metadata>{mark_text('plot')}</metadata>" + " " * 200_000 + "</svg>")
    assert holds_mark(ours, "plot") and not holds_mark(theirs, "plot") and not holds_mark(ours, "export")
    check_replaceable(ours, "plot", "--out plot.svg", "fix")
    check_replaceable(tmp_path / "new.png", "plot", "--out new.png", "fix")
    with pytest.raises(UserError) as refused:
        check_replaceable(theirs, "plot", "--out figure.png", "give --out another file name")
    assert refused.value.problems == [
        f"--out figure.png: {theirs} exists and lora_sft did not write it; `plot` replaces only its own: give --out another file name"
    ]
