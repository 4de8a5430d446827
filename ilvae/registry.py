"""Plug-in registry: decoders registered through the ``ilvae.decoders`` entry-point group.

A third-party package adds a decoder with, in its own ``pyproject.toml``::

    [project.entry-points."ilvae.decoders"]
    my_decoder = "my_package.module:MyDecoder"

The decoder is then listed by ``ilvae decoders`` and usable as ``--model.decoder=my_decoder``.
A plugin that fails to import is reported by name (``broken()``) and never breaks the others.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points

from ilvae.errors import check

GROUP = "ilvae.decoders"


@dataclass(frozen=True)
class Plugin:
    name: str
    value: str  # "module:Class"
    distribution: str  # "name version" of the package that registers it
    cls: type | None
    error: str | None


_cache: dict[str, dict[str, Plugin]] = {}


def _distribution(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "unknown"


def plugins(group: str = GROUP, reload: bool = False) -> dict[str, Plugin]:
    """All plugins registered in ``group``, loaded (or with the import error) by name."""
    if reload or group not in _cache:
        found: dict[str, Plugin] = {}
        for ep in entry_points(group=group):
            if ep.name in found:  # the same distribution seen twice on sys.path
                continue
            try:
                cls, error = ep.load(), None
            except Exception as exc:  # a broken plugin must not break the CLI
                cls, error = None, f"{type(exc).__name__}: {exc}"
            found[ep.name] = Plugin(ep.name, ep.value, _distribution(ep), cls, error)
        _cache[group] = dict(sorted(found.items()))
    return _cache[group]


def broken(group: str = GROUP) -> dict[str, Plugin]:
    return {n: p for n, p in plugins(group).items() if p.error is not None}


def warn_broken(group: str = GROUP) -> None:
    for plugin in broken(group).values():
        warnings.warn(
            f"decoder plugin {plugin.name!r} ({plugin.value}, from {plugin.distribution}) "
            f"failed to load and is skipped: {plugin.error}",
            stacklevel=2,
        )


def resolve(name: str, group: str = GROUP, base: type | None = None) -> type:
    """Class for a registered name, a class name of a registered plugin, or a dotted path."""
    table = plugins(group)
    if name in table:
        plugin = table[name]
        if plugin.cls is None:
            raise ValueError(f"decoder {name!r} is registered but failed to load: {plugin.error}")
        return plugin.cls
    for plugin in table.values():
        if plugin.cls is not None and plugin.cls.__name__ == name:
            return plugin.cls
    if "." in name:
        from ilvae._config import import_class

        cls = import_class(name)
        if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
            check("decoder", name, f"a subclass of {base.__name__}")
        return cls
    known = ", ".join(n for n, p in table.items() if p.cls is not None)
    check("decoder", name, f"one of the registered decoders ({known}) or a class path")
