"""The explicit package list in pyproject.toml covers every package folder, so a wheel or a non-editable
install ships all the code (a folder missing from the list would import here, from the checkout, and fail
only for users)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed() -> None:
    config = _setuptools()
    folders = {name: ROOT / path for name, path in config["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((name, *relative)))
    assert found, "no package found under the package-dir folders"
    assert sorted(found - set(config["packages"])) == [], "package folders missing from pyproject's packages"
    assert sorted(set(config["packages"]) - found) == [], "pyproject lists packages that do not exist"


def test_entry_points_name_importable_classes() -> None:
    import importlib

    from compress.methods import Method

    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["compress.plugins"]
    for name, target in entry_points.items():
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        assert issubclass(cls, Method) and cls.name == name, (name, target)


def test_every_data_file_in_a_package_is_shipped() -> None:
    """Files other than Python modules inside a package folder (the CUDA source the kernels compile at run time)
    are matched by package-data, or a wheel would leave them out."""
    config = _setuptools()
    data = config.get("package-data", {})
    folders = {name: ROOT / path for name, path in config["package-dir"].items()}
    missing = []
    for name, folder in folders.items():
        for path in folder.rglob("*"):
            if path.is_dir() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            package = ".".join((name, *path.parent.relative_to(folder).parts))
            if not any(path.match(pattern) for pattern in data.get(package, [])):
                missing.append(str(path.relative_to(ROOT)))
    assert missing == [], "package files not in pyproject's package-data"
