"""Griffe extension: load the sub-packages that pyproject.toml maps from other folders.

``callbacks/`` and ``datamodules/`` live at the top of the repository but are installed as
``ilvae.callbacks`` and ``ilvae.datamodules`` (``[tool.setuptools] package-dir``). Griffe reads
packages from their folder on disk and so cannot see them below ``ilvae``; this extension
visits each mapped folder as a sub-module of the package once the package is loaded, so the API
reference documents them under the names users import.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import griffe

_ROOT = Path(__file__).resolve().parent.parent


def _package_dirs() -> dict[str, Path]:
    setuptools = tomllib.loads((_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: _ROOT / folder for name, folder in setuptools.get("package-dir", {}).items()}


def _visit(loader: griffe.GriffeLoader, name: str, path: Path, parent: griffe.Module):
    module = griffe.visit(
        name,
        filepath=path,
        code=path.read_text(encoding="utf-8"),
        extensions=loader.extensions,
        parent=parent,
        docstring_parser=loader.docstring_parser,
        docstring_options=loader.docstring_options,
        lines_collection=loader.lines_collection,
        modules_collection=loader.modules_collection,
    )
    loader.lines_collection[path] = path.read_text(encoding="utf-8").splitlines()
    parent.set_member(name, module)
    return module


class PackageDir(griffe.Extension):
    """Attach the folders of ``package-dir`` entries ``pkg.sub = folder`` as ``pkg.sub``."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any):
        for dotted, folder in _package_dirs().items():
            parent_name, _, name = dotted.rpartition(".")
            if parent_name != pkg.path or name in pkg.members:
                continue
            module = _visit(loader, name, folder / "__init__.py", pkg)
            for file in sorted(folder.glob("*.py")):
                if file.stem != "__init__":
                    _visit(loader, file.stem, file, module)
            loader.expand_exports(module)
            loader.expand_wildcards(module, external=False)
