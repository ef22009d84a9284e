"""The README's commands exist as written: every ``python SCRIPT.py`` line of its shell blocks names a
script of the tree, and every ``--option`` it passes is one that script's ``--help`` lists."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import lru_cache

import pytest

from tests.conftest import ROOT


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(script, options)`` of each command line in the README's ```bash blocks."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines are one command
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            tokens = shlex.split(line, comments=True)
            scripts = [t for t in tokens if t.endswith(".py") and (ROOT / t).suffix == ".py" and "/" in t or t in ("infer.py", "export.py")]
            if tokens[0] not in ("python", "torchrun") or not scripts:
                continue
            after = tokens[tokens.index(scripts[0]) + 1:]  # python's and torchrun's own options come before
            options = [t.split("=")[0] for t in after if t.startswith("--")]
            commands.append((scripts[0], options))
    return commands


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def test_the_readme_has_commands():
    assert len(readme_commands()) > 20


@pytest.mark.parametrize("script, options", readme_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_readme_command_exists_with_its_options(script, options):
    assert (ROOT / script).is_file(), f"the README runs {script}, which does not exist"
    listed = set(re.findall(r"--[a-z0-9][a-z0-9-]*", help_text(script)))
    unknown = [o for o in options if o not in listed]
    assert not unknown, f"{script}: the README passes {unknown}, which --help does not list"
