"""The command line's structure: a tree of modules without a circle, and help without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mistol
from mistol.cli import build_parser, main
from mistol.commands import COMMANDS

PACKAGE = Path(mistol.__file__).parent
HEAVY = ("torch", "numpy", "transformers", "fastapi", "uvicorn", "sympy", "safetensors", "tqdm")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, by absolute name (`from . import x` counts as `package.x`)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_but_the_entry_point_imports_the_cli():
    importers = sorted(module_name(path) for path in PACKAGE.rglob("*.py")
                       if "mistol.cli" in imported_modules(path))
    assert importers == ["mistol.__main__"]


def test_command_modules_share_only_the_options_module():
    for name in COMMANDS:
        path = PACKAGE / "commands" / f"{name}.py"
        assert path.is_file(), name
        siblings = {m for m in imported_modules(path) if m.startswith("mistol.commands.")
                    and m != "mistol.commands.COMMANDS" and not m.startswith("mistol.commands.options")}
        assert not siblings, (name, siblings)


def imports_of(*args: str) -> set[str]:
    """The modules `python -m mistol ARGS` imports, from -X importtime."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "mistol", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: mistol" in result.stdout
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["--help"], ["chat", "--help"]])
def test_help_does_not_import_torch(args):
    modules = imports_of(*args)
    assert "mistol.cli" in modules
    assert not {m for m in modules if m.split(".")[0] in HEAVY}


def test_every_command_registers_without_heavy_imports():
    code = ("import sys; from mistol.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_the_help_lists_every_command_and_only_the_named_one_is_registered_in_full(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    parser = build_parser(["chat", "--help"])
    choices = parser._subparsers._group_actions[0].choices
    assert any(a.dest == "system" for a in choices["chat"]._actions)
    assert not any(a.dest == "prompt" for a in choices["generate"]._actions)


def test_quant_is_the_option_and_dtype_its_hidden_former_name(capsys):
    parser = build_parser(["generate"])
    assert parser.parse_args(["generate", "-m", "m", "-p", "x"]).quant == "auto"
    assert parser.parse_args(["generate", "-m", "m", "-p", "x", "--quant", "int4"]).quant == "int4"
    assert parser.parse_args(["generate", "-m", "m", "-p", "x", "--dtype", "bf16"]).quant == "bf16"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    usage = capsys.readouterr().out
    assert "--quant {auto,f32,bf16,f16,int8,int4}" in usage and "--dtype" not in usage
