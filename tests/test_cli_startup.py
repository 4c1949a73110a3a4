"""`compress --help` and every command's --help answer without importing torch, transformers or compress (issue 19,
finding 10: they took 4-7 s); the `compress` script's logging prints the Hub's warnings once."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMMANDS = ["plugins", "validate", "apply", "eval", "report"]

HELP = """
import importlib, sys
module, _, attr = {target!r}.partition(":")
main = getattr(importlib.import_module(module), attr)
for args in {argv!r}:
    sys.argv = ["compress", *args]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
print("IMPORTED", sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "transformers", "compress"}}))
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_help_imports_neither_torch_nor_compress() -> None:
    target = PYPROJECT["project"]["scripts"]["compress"]
    argv = [["--help"], ["--version"], *([command, "--help"] for command in COMMANDS)]
    result = _python(HELP.format(target=target, argv=argv))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Usage: compress [OPTIONS] COMMAND [ARGS]..." in result.stdout
    for command in COMMANDS:
        assert f"Usage: compress {command} [OPTIONS]" in result.stdout
    assert result.stdout.splitlines()[-1] == "IMPORTED []"


def test_the_script_module_is_installed() -> None:
    """The console script's module sits outside the compress package (importing anything inside imports torch), so
    pyproject must install it as a module of its own."""
    module = PYPROJECT["project"]["scripts"]["compress"].partition(":")[0]
    assert "." not in module and (REPO / f"{module}.py").exists()
    assert module in PYPROJECT["tool"]["setuptools"].get("py-modules", [])


def test_the_module_runs_as_a_script() -> None:
    """`python -m compress_cli` is the command too (where the console script is not on the PATH)."""
    import compress_cli

    assert sorted(compress_cli.cli.commands) == sorted(COMMANDS)
    result = subprocess.run([sys.executable, "-m", "compress_cli", "report", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0 and "report [OPTIONS] REPORTS..." in result.stdout, result.stderr


def test_hub_warnings_are_logged_once() -> None:
    """huggingface_hub and datasets attach a handler of their own and also pass records to the root logger, which the
    command line configures: without care every warning prints twice."""
    result = _python("import compress_cli, logging\n"
                     "compress_cli._setup_logging(0)\n"
                     "from huggingface_hub.utils import logging as hub_logging\n"
                     "from datasets.utils import logging as datasets_logging\n"
                     "hub_logging.get_logger('huggingface_hub.x').warning('hub warning')\n"
                     "datasets_logging.get_logger('datasets.x').warning('datasets warning')\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("hub warning") == 1 and result.stderr.count("datasets warning") == 1, result.stderr
