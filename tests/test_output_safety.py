"""Nothing lost (issue 16): every command refuses, before any work, an output that exists (unless
--overwrite, and then only a previous output of the same command), that is one of its inputs, that names
no new entry (``-o .``) or that cannot be written -- one line, exit 2, nothing created or deleted.

The checks come first in every command, so the inputs here need not be valid for the command: a refused
run never reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prott5nv.cli import main as cli_main
from prott5nv.errors import OutputError
from prott5nv.fsutil import check_output

FASTA = ">p1\nMKTAYIAKQRQISFVKSHFSRQ\n>p2\nMSEQLLKALVAGGAAEK\n"

# command -> (output kind, output name, argv given INPUT, OUT and the model directory)
COMMANDS = {
    "embed": ("file", "out.h5", lambda i, o, m: ["embed", i, "-o", o, "--model", m]),
    "embed-npy": ("dir", "out_npy", lambda i, o, m: ["embed", i, "-o", o, "--model", m]),
    "generate": ("file", "out.tsv", lambda i, o, m: ["generate", i, "-o", o, "--model", m]),
    "infill": ("file", "out.fa", lambda i, o, m: ["infill", i, "-o", o, "--model", m]),
    "infill-probabilities": ("file", "probs.tsv",
                             lambda i, o, m: ["infill", i, "-o", "filled.fa", "--probabilities", o, "--model", m]),
    "score": ("file", "out.csv", lambda i, o, m: ["score", i, "-o", o, "--model", m]),
    "score-variants": ("file", "out.csv", lambda i, o, m: ["score-variants", i, "M1A", "-o", o, "--model", m]),
    "predict": ("file", "out.csv", lambda i, o, m: ["predict", "run", i, "-o", o]),
    "convert": ("dir", "converted", lambda i, o, m: ["convert", i, o]),
    "export-onnx": ("file", "out.onnx", lambda i, o, m: ["export-onnx", i, "-o", o]),
    "preprocess": ("dir", "data_dir", lambda i, o, m: ["preprocess", i, "-o", o]),
    "finetune": ("dir", "run_out", lambda i, o, m: ["finetune", i, "-o", o, "--model", m]),
}  # fmt: skip


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory with the input FASTA and a predictor run directory (an input of predict)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.fa").write_text(FASTA)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "predictor.json").write_text("{}\n")
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root`: a file's bytes, None for a directory."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def refused(argv: list[str], root: Path, capsys, *names: str) -> str:
    """Run `argv`, assert exit 2, one line naming each of `names`, and no change under `root`."""
    before = snapshot(root)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert f"'{name}'" in err, err
    assert snapshot(root) == before
    return err


def make_existing(path: Path, kind: str) -> None:
    if kind == "file":
        path.write_text("precious\n")
    else:
        path.mkdir()
        (path / "keep.txt").write_text("precious\n")


@pytest.mark.parametrize("command", COMMANDS)
def test_existing_output_is_refused(workdir, tiny_checkpoint, capsys, command):
    kind, out, argv = COMMANDS[command]
    make_existing(workdir / out, kind)
    err = refused(argv("in.fa", out, str(tiny_checkpoint)), workdir, capsys, out)
    assert "already exists" in err and "--overwrite" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_replaces_only_this_commands_output(workdir, tiny_checkpoint, capsys, command):
    """A directory where a file is written, or a directory that is not this command's output (no marker
    file: `mkdir d && echo x > d/keep.txt && prott5nv embed in.fa -o d` deleted keep.txt), survives
    --overwrite."""
    kind, out, argv = COMMANDS[command]
    make_existing(workdir / out, "dir")
    err = refused([*argv("in.fa", out, str(tiny_checkpoint)), "--overwrite"], workdir, capsys, out)
    assert ("is a directory" if kind == "file" else "not an output of this command") in err
    if kind == "dir":  # a file where a directory is written
        (workdir / "plain").write_text("precious\n")
        err = refused([*argv("in.fa", "plain", str(tiny_checkpoint)), "--overwrite"], workdir, capsys, "plain")
        assert "not a directory" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_input_as_output_is_refused(workdir, tiny_checkpoint, capsys, command):
    _, _, argv = COMMANDS[command]
    for flags in ([], ["--overwrite"]):
        err = refused([*argv("in.fa", "in.fa", str(tiny_checkpoint)), *flags], workdir, capsys, "in.fa")
        assert "is the input" in err
        # the same file under another spelling: resolved paths are compared
        refused([*argv("in.fa", "run/../in.fa", str(tiny_checkpoint)), *flags], workdir, capsys, "run/../in.fa")


@pytest.mark.parametrize("command", COMMANDS)
def test_dot_is_refused(workdir, tiny_checkpoint, capsys, command):
    _, _, argv = COMMANDS[command]
    for flags in ([], ["--overwrite"]):
        err = refused([*argv("in.fa", ".", str(tiny_checkpoint)), *flags], workdir, capsys, ".")
        assert "empty name" not in err


def _unwritable_dir(root: Path) -> Path | None:
    """A directory this process cannot create files in (chmod 0o555), or None where chmod does not stop
    writes (root, some file systems)."""
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    probe = ro / "probe"
    try:
        probe.write_text("")
    except OSError:
        return ro
    probe.unlink()
    ro.chmod(0o755)
    ro.rmdir()
    return None


@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_place_is_refused_before_any_work(workdir, tiny_checkpoint, capsys, command):
    kind, out, argv = COMMANDS[command]
    ro = _unwritable_dir(workdir)
    target = f"ro/{out}" if ro is not None else f"/proc/{out}"  # /proc: no new files, even for root
    try:
        err = refused(argv("in.fa", target, str(tiny_checkpoint)), workdir, capsys, target)
        assert "cannot create files" in err
    finally:
        if ro is not None:
            ro.chmod(0o755)


def test_model_directory_is_an_input(workdir, tiny_checkpoint, capsys):
    before = snapshot(tiny_checkpoint)
    for argv in (["embed", "in.fa", "-o", str(tiny_checkpoint), "--model", str(tiny_checkpoint), "--overwrite"],
                 ["convert", str(tiny_checkpoint), str(tiny_checkpoint), "--overwrite"],
                 ["finetune", "in.fa", "-o", str(tiny_checkpoint.parent), "--model", str(tiny_checkpoint),
                  "--overwrite"]):  # fmt: skip
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "the input" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tiny_checkpoint) == before


def test_overwrite_replaces_a_previous_output(workdir, tiny_checkpoint, capsys):
    model = str(tiny_checkpoint)
    for out in ("out.h5", "out_npy"):
        assert cli_main(["embed", "in.fa", "-o", out, "--model", model]) == 0
        first = snapshot(workdir)
        assert cli_main(["embed", "in.fa", "-o", out, "--model", model]) == 2
        assert snapshot(workdir) == first
        assert cli_main(["embed", "in.fa", "-o", out, "--model", model, "--overwrite"]) == 0
        assert sorted(snapshot(workdir)) == sorted(first)  # the same entries, no temporaries left
    masked = ">m\nMKT<mask>AYIAKQR\n"
    (workdir / "masked.fa").write_text(masked)
    assert cli_main(["generate", "masked.fa", "-o", "g.tsv", "--model", model, "--max-new-tokens", "4"]) == 0
    (workdir / "g.tsv").write_text("old\n")
    assert cli_main(["generate", "masked.fa", "-o", "g.tsv", "--model", model, "--max-new-tokens", "4",
                     "--overwrite"]) == 0  # fmt: skip
    assert (workdir / "g.tsv").read_text().startswith("id\trank\tscore\ttarget\tfilled\n")
    capsys.readouterr()
    assert cli_main(["generate", "masked.fa", "-o", "-", "--model", model, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("id\trank") and not (workdir / "-").exists()


def test_check_output_rules(tmp_path):
    inp = tmp_path / "in.fa"
    inp.write_text(FASTA)
    link = tmp_path / "link.fa"
    link.symlink_to(inp)
    with pytest.raises(OutputError, match="is the input"):
        check_output(link, inputs=[inp], overwrite=True)
    with pytest.raises(OutputError, match="holds the input"):
        check_output(tmp_path, inputs=[inp], overwrite=True, kind="dir")
    with pytest.raises(OutputError, match="is not a directory"):
        check_output(inp / "sub" / "out.h5")
    assert check_output(tmp_path / "new" / "deeper" / "out.h5") == tmp_path / "new" / "deeper" / "out.h5"
    assert sorted(os.listdir(tmp_path)) == ["in.fa", "link.fa"]  # missing parents are not made here
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "index.tsv").write_text("")
    check_output(tmp_path / "prev", overwrite=True, kind="dir", marker="index.tsv")


def test_embed_api_never_replaces_a_foreign_directory(tmp_path, tiny_model):
    """The Python API replaces a previous output (no --overwrite there), but never a directory that is
    not one (no index.tsv), a directory where a file goes, or its input."""
    from prott5nv.inference.embed import embed_fasta

    inp = tmp_path / "in.fa"
    inp.write_text(FASTA)
    make_existing(tmp_path / "d", "dir")
    make_existing(tmp_path / "f.h5", "dir")
    before = snapshot(tmp_path)
    for out in ("d", "f.h5", "in.fa"):
        with pytest.raises(OutputError, match=out):
            embed_fasta(tiny_model, inp, tmp_path / out)
    assert snapshot(tmp_path) == before
    embed_fasta(tiny_model, inp, tmp_path / "e")
    embed_fasta(tiny_model, inp, tmp_path / "e")  # a previous output: replaced
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["attrs.tsv", "index.tsv", "p1.npy", "p2.npy"]


LOCALIZATION = Path(__file__).parent / "data" / "localization_600.csv.gz"

# directory outputs: argv given the output and the model; a stale entry a previous output of the same command
# may hold that the new one does not write (replaced: removed), and the marker every output has
DIR_OUTPUTS = {
    "embed-npy": (lambda o, m: ["embed", "in.fa", "-o", o, "--model", m], "P99999.npy", "index.tsv"),
    "convert": (lambda o, m: ["convert", m, o], "prott5nv_tokenizer.json", "config.json"),
    "preprocess": (lambda o, m: ["preprocess", "in.fa", "-o", o], "_work", "manifest.json"),
    "finetune": (lambda o, m: ["finetune", str(LOCALIZATION), "-o", o, "--features", "composition",
                               "--max-epochs", "2"], "old_plot.png", "predictor.json"),
}  # fmt: skip


@pytest.mark.parametrize("command", DIR_OUTPUTS)
def test_overwrite_keeps_what_the_command_does_not_write(workdir, tiny_checkpoint, capsys, command):
    """`prott5nv convert RUN/model src/prott5nv/pretrained/prott5nv-demo --overwrite` deleted the model card
    README.md beside the checkpoint files: --overwrite replaces the entries the command writes (and removes
    stale ones of its earlier output) but keeps everything else, in the same rename."""
    argv, stale, marker = DIR_OUTPUTS[command]
    out = workdir / "out"
    assert cli_main(argv("out", str(tiny_checkpoint))) == 0
    (out / "README.md").write_text("model card\n")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("precious\n")
    (out / "link.txt").symlink_to("README.md")
    (out / stale).mkdir() if stale == "_work" else (out / stale).write_text("stale\n")
    (out / marker).write_text("{}\n")  # changed: the rerun must write it again
    assert cli_main([*argv("out", str(tiny_checkpoint)), "--overwrite"]) == 0
    assert (out / "README.md").read_text() == "model card\n"
    assert (out / "notes" / "todo.txt").read_text() == "precious\n"
    assert os.readlink(out / "link.txt") == "README.md"
    assert not (out / stale).exists() and (out / marker).read_text() != "{}\n"
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".")) == []  # no temporaries left


@pytest.mark.parametrize("command", DIR_OUTPUTS)
def test_an_empty_directory_is_a_new_output(workdir, tiny_checkpoint, command):
    """An empty directory holds nothing to lose: accepted without --overwrite (`mkdir out` first)."""
    argv, _, marker = DIR_OUTPUTS[command]
    (workdir / "out").mkdir()
    assert cli_main(argv("out", str(tiny_checkpoint))) == 0
    assert (workdir / "out" / marker).is_file()


def test_pretrain_run_directory(workdir, capsys):
    """pretrain's --out is a run directory: rerunning resumes it, so an earlier run's directory (its
    config.yaml) is accepted; anything else that exists, an input, '.' or an unwritable place is refused
    before any work, and a data directory without training sequences leaves no run directory behind."""
    assert cli_main(["preprocess", "in.fa", "-o", "data", "--val", "2"]) == 0  # both records in val
    make_existing(workdir / "foreign", "dir")
    base = ["pretrain", "--data", "data", "--preset", "tiny", "--max-steps", "1"]
    refused([*base, "--out", "data"], workdir, capsys, "data")
    refused([*base, "--out", "."], workdir, capsys, ".")
    err = refused([*base, "--out", "foreign"], workdir, capsys, "foreign")
    assert "not an output of this command" in err
    ro = _unwritable_dir(workdir)
    target = "ro/run" if ro is not None else "/proc/run"
    try:
        assert "cannot create files" in refused([*base, "--out", target], workdir, capsys, target)
    finally:
        if ro is not None:
            ro.chmod(0o755)
    before = snapshot(workdir)
    assert cli_main([*base, "--out", "new_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "prott5nv pretrain: error: data: the train split is empty (preprocess with a smaller --val/--test)"
    assert snapshot(workdir) == before
