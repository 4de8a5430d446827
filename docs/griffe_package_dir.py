"""Griffe extension: document sub-packages that are installed from another folder.

``callbacks/`` and ``datamodules/`` live at the top of the repository but are installed as
``ilvae.callbacks`` and ``ilvae.datamodules`` (``[tool.setuptools] package-dir``). Griffe reads
a package from its folder on disk and so cannot see them below ``ilvae``; this extension asks
the import system where each listed sub-package is installed and visits that folder as a
sub-module of the package once the package is loaded, so the API reference documents them under
the names users import. Configured in mkdocs.yml with the list ``packages``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import griffe


def _visit(loader: griffe.GriffeLoader, name: str, path: Path,
           parent: griffe.Module) -> griffe.Module:
    code = path.read_text(encoding="utf-8")
    module = griffe.visit(
        name,
        filepath=path,
        code=code,
        extensions=loader.extensions,
        parent=parent,
        docstring_parser=loader.docstring_parser,
        docstring_options=loader.docstring_options,
        lines_collection=loader.lines_collection,
        modules_collection=loader.modules_collection,
    )
    loader.lines_collection[path] = code.splitlines()
    parent.set_member(name, module)
    return module


class PackageDir(griffe.Extension):
    """Attach each installed sub-package of ``packages`` (dotted names) to its parent."""

    def __init__(self, packages: list[str]) -> None:
        super().__init__()
        self.packages = list(packages)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader,
                   **kwargs: Any) -> None:
        for dotted in self.packages:
            parent_name, _, name = dotted.rpartition(".")
            if parent_name != pkg.path or name in pkg.members:
                continue
            spec = importlib.util.find_spec(dotted)
            if spec is None or not spec.submodule_search_locations:
                raise ModuleNotFoundError(f"{dotted} is not installed as a package")
            folder = Path(next(iter(spec.submodule_search_locations)))
            module = _visit(loader, name, folder / "__init__.py", pkg)
            for file in sorted(folder.glob("*.py")):
                if file.stem != "__init__":
                    _visit(loader, file.stem, file, module)
            loader.expand_exports(module)
            loader.expand_wildcards(module, external=False)
