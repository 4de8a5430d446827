"""Record the constructor arguments of building blocks so a model can save and rebuild them.

A decoder, encoder or prior built from a jsonargparse callable, a registered name or a class
is stored in the model's hyper-parameters as ``{"class_path": ..., "init_args": ...}``; this is
what makes ``load_from_checkpoint`` rebuild exactly the same block without the CLI.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
from typing import Any

from ilvae.errors import check


class Configurable:
    """Mixin: instances remember the keyword arguments they were built with (``self.config``).

    Sizes supplied by the model (``latent_dim``, ``data_dim``, ``data_shape``) are kept apart in
    :attr:`supplied_args`, so the saved spec is exactly what a user would write in a config file.
    """

    _supplied = ("latent_dim", "data_dim", "data_shape")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args: Any, **kw: Any) -> None:
            # Only the outermost constructor records: subclasses call super().__init__ too.
            outermost = not getattr(self, "_recording", False)
            if outermost:
                object.__setattr__(self, "_recording", True)
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop("self")
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        arguments.update(arguments.pop(name, {}))
            init(self, *args, **kw)
            if outermost:
                object.__setattr__(self, "_recording", False)
                object.__setattr__(self, "_init_arguments", arguments)

        cls.__init__ = __init__

    @property
    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` of this object, without the supplied sizes."""
        args = {k: copy.deepcopy(v) for k, v in self._init_arguments.items()
                if k not in self._supplied}
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}

    @property
    def supplied_args(self) -> dict[str, Any]:
        return {k: v for k, v in self._init_arguments.items() if k in self._supplied}


def import_class(class_path: str) -> type:
    """Import ``"package.module.Class"``."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        check("class_path", class_path, "a dotted path 'module.Class'")
    return getattr(importlib.import_module(module_name), name)


def build_component(
    spec: Any, *supplied: Any, base: type, field: str, resolve_name: Any = None
) -> Any:
    """Build a block from any of the forms users give.

    ``spec`` may be an instance (returned as is), a class or callable (called with the supplied
    sizes), a ``{"class_path", "init_args"}`` dict (saved hyper-parameters), or a string: a name
    resolved by ``resolve_name`` (the decoder registry) or a dotted class path.
    """
    if isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        cls = resolve_name(spec) if resolve_name is not None else import_class(spec)
        return cls(*supplied)
    if isinstance(spec, dict):
        if "class_path" not in spec:
            raise ValueError(f"{field}: a dict spec needs 'class_path', got keys {sorted(spec)}")
        path = spec["class_path"]
        cls = resolve_name(path) if resolve_name is not None else import_class(path)
        return cls(*supplied, **dict(spec.get("init_args") or {}))
    if callable(spec):
        built = spec(*supplied)
        if not isinstance(built, base):
            raise TypeError(f"{field}: expected a {base.__name__}, got {type(built).__name__}")
        return built
    raise TypeError(f"{field}: cannot build a {base.__name__} from {type(spec).__name__}")
