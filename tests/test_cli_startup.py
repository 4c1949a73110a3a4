"""`compress --help` and every command's --help answer without importing torch, transformers or compress, and
`compress plugins` without importing transformers (issue 19, finding 10: they took 4-7 s), while `import compress`
still teaches transformers to load compress checkpoints; the `compress` script's logging prints the Hub's warnings
once."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import torch

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMMANDS = ["plugins", "validate", "apply", "eval", "report", "push", "export"]

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


def test_plugins_lists_every_method_without_importing_transformers() -> None:
    result = _python("import sys, compress_cli\n"
                     "sys.argv = ['compress', 'plugins']\n"
                     "try:\n    compress_cli.main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None)\n"
                     "print('TRANSFORMERS', 'transformers' in sys.modules)\n")
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("gptq", "awq", "rtn", "sparsegpt", "wanda"):
        assert f"\n{method} " in "\n" + result.stdout
    assert result.stdout.splitlines()[-1] == "TRANSFORMERS False"


def test_import_compress_before_transformers_still_registers_its_checkpoints(tmp_path) -> None:
    """`import compress` no longer imports transformers: it registers compress's quantizer when transformers' own
    registry is imported, so from_pretrained loads a compress checkpoint as before."""
    import compress
    from compress.formats import CompressedLinear
    from conftest import make_tiny

    model = compress.apply(make_tiny("llama"), [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}], device="cpu")
    compress.save(model, tmp_path / "ck")
    x = torch.arange(8)[None]
    expect = model(x).logits
    torch.save(x, tmp_path / "x.pt")
    result = _python("import sys, torch, compress\n"
                     "print('BEFORE', 'transformers' in sys.modules)\n"
                     "from transformers import AutoModelForCausalLM\n"
                     f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ck')!r})\n"
                     "from compress.formats import CompressedLinear\n"
                     "print('LAYERS', sum(isinstance(m, CompressedLinear) for m in model.modules()))\n"
                     f"torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})).logits, {str(tmp_path / 'y.pt')!r})\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BEFORE False" in result.stdout
    layers = sum(isinstance(m, CompressedLinear) for m in model.modules())
    assert f"LAYERS {layers}" in result.stdout and layers > 0
    assert torch.equal(torch.load(tmp_path / "y.pt"), expect)


def test_peak_memory_is_the_process_own_not_its_parents() -> None:
    """`compress apply` prints its peak resident memory: a process started by a larger one (a benchmark that first
    saved a model) must not report its parent's peak, as getrusage's ru_maxrss does (it survives exec)."""
    child = "from compress.cli import peak_rss; print(peak_rss())"
    parent = (f"import subprocess, sys; big = b'x' * 1_500_000_000; "
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True).stdout)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, cwd=REPO, check=True)
    assert 10e6 < int(out.stdout.strip()) < 1e9, out  # the child holds no more than its imports
