"""The tree's rules, checked: imports read top to bottom, one atomic writer, one image-list reader, no
``sys.path`` tricks, ``SystemExit`` only in ``main()``, and every command's ``--help`` without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Stage of each top-level package: a module may import from its own stage or an earlier one, never a later.
STAGES = {"core": 0, "experts": 1, "scoring": 2, "data_prep": 3, "train": 3, "evaluation": 4, "bench": 5,
          "infer": 5, "service": 5, "serve": 5, "export": 5}
SOURCES = sorted(p for p in ROOT.rglob("*.py")
                 if p.relative_to(ROOT).parts[0] in STAGES or p.name == "infer.py"
                 or p.relative_to(ROOT).as_posix() in ("serve.py", "export.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_the_tree_is_found():
    assert len(SOURCES) > 40 and ROOT / "infer.py" in SOURCES


def test_no_module_imports_from_a_later_stage():
    wrong = []
    for path in SOURCES:
        stage = STAGES[path.relative_to(ROOT).parts[0].removesuffix(".py")]
        for name in _imports(ast.parse(path.read_text())):
            top = name.split(".")[0]
            if top in STAGES and STAGES[top] > stage:
                wrong.append(f"{_rel(path)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_sys_path_manipulation():
    offenders = [_rel(p) for p in [*SOURCES, *ROOT.glob("tests/*.py")]
                 if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()]
    assert offenders == [p for p in offenders if p == "tests/test_layout.py"]


def test_one_atomic_writer():
    """Every rename-into-place and temporary file of the project is core/files.py's."""
    offenders = [_rel(p) for p in SOURCES if _rel(p) != "core/files.py"
                 and any(s in p.read_text() for s in ("os.replace(", "os.rename(", "mkstemp(", "mkdtemp("))]
    assert not offenders


def test_one_image_list_reader():
    """Only core/image_lists.py turns a folder into a list of images (rglob over image files)."""
    offenders = [_rel(p) for p in SOURCES if _rel(p) != "core/image_lists.py" and "is_image_file" in p.read_text()
                 and any(walk in p.read_text() for walk in (".rglob(", "os.walk(", ".iterdir(", "glob.glob("))]
    assert not offenders


def _raises_system_exit_outside_main(tree: ast.AST) -> list[str]:
    found = []
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        if func.name == "main":
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                    found.append(f"{func.name}:{node.lineno}")
    return found


def test_system_exit_only_in_main():
    offenders = {_rel(p): f for p in SOURCES if (f := _raises_system_exit_outside_main(ast.parse(p.read_text())))}
    assert not offenders


def _commands() -> list[Path]:
    return [p for p in SOURCES if "\ndef main(" in p.read_text() and 'if __name__ == "__main__"' in p.read_text()]


CHECK_HELP = """
import runpy, sys
path = sys.argv[1]
sys.argv = [path, "--help"]
try:
    runpy.run_path(path, run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "transformers", "timm", "sklearn", "albumentations", "diffusers") if m in sys.modules)
print("RESULT", code, ",".join(heavy) or "-")
"""


@pytest.mark.parametrize("command", [_rel(p) for p in _commands()])
def test_help_works_from_anywhere_and_imports_no_torch(command, tmp_path):
    """``--help`` is instant: it parses options before any heavy import (timed in bench/startup.py)."""
    result = subprocess.run([sys.executable, "-c", CHECK_HELP, str(ROOT / command)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert last.startswith("RESULT 0 "), last
    assert last == "RESULT 0 -", f"{command} --help imports {last.split()[-1]}"
    assert "(default: None)" not in result.stdout


def test_no_function_but_main_takes_an_argparse_namespace():
    """Library functions take typed arguments; argparse stays in ``main()`` (and the parser builders)."""
    offenders = []
    for path in SOURCES:
        for func in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)):
            if func.name == "main":
                continue
            for arg in func.args.args + func.args.kwonlyargs:
                if arg.annotation is not None and "Namespace" in ast.unparse(arg.annotation):
                    offenders.append(f"{_rel(path)}:{func.name}")
    assert not offenders


def test_progress_bars_only_through_core_progress():
    """tqdm draws into redirected logs; core.progress draws only on a terminal."""
    offenders = [_rel(p) for p in SOURCES if _rel(p) != "core/progress.py"
                 and any(n.split(".")[0] == "tqdm" for n in _imports(ast.parse(p.read_text())))]
    assert not offenders


def test_the_package_installs_every_stage_and_its_commands_resolve():
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"])
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert on_disk - {"tests"} <= packages and set(STAGES) - {"infer", "serve", "export"} <= packages
    for name, target in project["project"]["scripts"].items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.14.1" in requirements and "torchvision==0.29.1" in requirements and "-e ." in requirements
