"""The README's examples run as written: every `prott5nv ...` command and every Python block."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S)


def readme_blocks() -> list[list[str]]:
    """The `prott5nv` invocations of each bash block, in order (for `a && prott5nv ...`, the prott5nv
    part). A block's commands run one after another in one directory, as a reader would run them."""
    blocks = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        cmds = []
        for line in body.splitlines():
            for part in line.split("&&"):
                part = part.split(" #")[0].strip()
                if part.startswith("prott5nv "):
                    cmds.append(part)
        if cmds:
            blocks.append(cmds)
    return blocks


def test_readme_has_the_two_setup_commands():
    bash = [body for lang, body in BLOCKS if lang == "bash"]
    assert any("prott5nv embed examples/sample.fasta" in b and "pip install" in b for b in bash)
    assert any("pytest" in b and "pip install" in b for b in bash)
    assert "pytest" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("commands", readme_blocks(), ids=lambda cmds: cmds[0][:40])
def test_readme_commands_run(commands, tmp_path):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copytree(REPO / "tests" / "data", tmp_path / "tests" / "data")
    for command in commands:
        argv = [sys.executable, "-m", "prott5nv", *shlex.split(command)[1:]]
        res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{command}\n{res.stderr}"


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index][1], f"README.md python block {index}", "exec"), {})
