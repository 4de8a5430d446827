"""User-facing errors: reported by the CLI as one line naming the field and what is allowed.

Also the translation of what torch and Lightning refuse while a run is set up (optimiser
arguments, Trainer settings) into such errors, so that they read like ilvae's own:
``field=value is not allowed: expected …``.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException


class ConfigurationError(ValueError):
    """Bad configuration or bad data, detected before (or at the very start of) training."""


class CheckpointError(ConfigurationError):
    """A checkpoint file that cannot be used: missing, truncated, corrupted or untrusted."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stopped before saving anything else.

    ``report`` holds the step, epoch, batch index, the loss terms logged at that step and the
    last checkpoint written before it.
    """

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = dict(report or {})


# ----------------------------------------------------------------- validation
def check(field: str, value: Any, expected: str) -> NoReturn:
    """Raise the one message format of every configuration check:
    ``field=value is not allowed: expected …``.

    >>> check("beta", -1.0, "a finite number >= 0")
    Traceback (most recent call last):
    ...
    ilvae.errors.ConfigurationError: beta=-1.0 is not allowed: expected a finite number >= 0
    """
    raise ConfigurationError(f"{field}={value!r} is not allowed: expected {expected}")


def check_number(field: str, value: float, *, minimum: float = 0.0, strict: bool = False,
                 maximum: float | None = None, strict_maximum: bool = False) -> float:
    """``float(value)``, or :func:`check` raises unless ``value`` is a finite real number (not a
    bool) ≥ ``minimum`` (> with ``strict``) and, if given, ≤ ``maximum`` (< with
    ``strict_maximum``).

    >>> check_number("delta", 1.0, maximum=1.0, strict_maximum=True)
    Traceback (most recent call last):
    ...
    ilvae.errors.ConfigurationError: delta=1.0 is not allowed: expected a number in [0, 1)
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if maximum is not None:
        ok = ok and (value < maximum if strict_maximum else value <= maximum)
    if not ok:
        if maximum is None:
            check(field, value, f"a finite number {'>' if strict else '>='} {minimum:g}")
        check(field, value, f"a number in {'(' if strict else '['}{minimum:g}, {maximum:g}"
                            f"{')' if strict_maximum else ']'}")
    return float(value)


def check_int(field: str, value: Any, minimum: int = 1) -> int:
    """``int(value)``, or :func:`check` raises unless ``value`` is an integer (not a bool)
    ≥ ``minimum``.

    >>> check_int("every_n_epochs", 0)
    Traceback (most recent call last):
    ...
    ilvae.errors.ConfigurationError: every_n_epochs=0 is not allowed: expected an integer >= 1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        check(field, value, f"an integer >= {minimum}")
    return int(value)


# ----------------------------------------------------------------- refused at set-up
# What torch and Lightning raise for arguments they refuse while a run is being set up.
SETUP_ERRORS = (MisconfigurationException, ValueError, TypeError)
_MUST = re.compile(r"`(\w+)` must be (.+?)\.(?:\s|$)")
_NAMED = re.compile(r"`(\w+)(?:=[^`]*)?`|\b(\w+)=")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _field(key: str) -> str:
    """A parsed configuration key as users write it: ``model.optimizer.lr``."""
    return ".".join(part for part in key.split(".") if part not in ("init_args", "class_path"))


def _culprit(build: Any, kwargs: dict[str, Any]) -> tuple[str | None, BaseException | None]:
    """``(None, None)`` if ``build(**kwargs)`` works; else the argument whose default makes it
    work (None if no single one does) and the error the full call raised."""
    try:
        build(**kwargs)
    except SETUP_ERRORS as exc:
        error = exc
    else:
        return None, None
    for name in kwargs:
        try:
            build(**{k: v for k, v in kwargs.items() if k != name})
        except SETUP_ERRORS:
            continue
        return name, error
    return None, error


def check_optimizers(config: Any) -> None:
    """Build every optimiser and learning-rate scheduler that ``config`` names on a stand-in
    parameter, so that an argument torch refuses (``lr=-1``) is reported, naming its field,
    before anything is built or written; the model builds the real ones when fitting starts."""
    import torch

    from ilvae._config import import_class

    kinds = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
             torch.optim.lr_scheduler.ReduceLROnPlateau)
    found = []
    for key, class_path in config.items():
        if key.rpartition(".")[2] != "class_path" or not isinstance(class_path, str):
            continue
        try:
            cls = import_class(class_path)
        except (ImportError, AttributeError, ValueError):
            continue
        if not (isinstance(cls, type) and issubclass(cls, kinds)):
            continue
        prefix = key[:-len("class_path")]
        init = config.get(prefix + "init_args")
        kwargs = dict(vars(init)) if init is not None else {}
        if any(hasattr(value, "class_path") for value in kwargs.values()):
            continue  # nested classes: left to the real build
        is_optimizer = issubclass(cls, torch.optim.Optimizer)
        found.append((not is_optimizer, prefix.rstrip("."), class_path, cls, kwargs))

    def stand_in() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.zeros(1))]

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.Adam(stand_in())

    for is_scheduler, key, class_path, cls, kwargs in sorted(found, key=lambda row: row[0]):
        def build(_cls: Any = cls, _sched: bool = is_scheduler, **args: Any) -> Any:
            return _cls(optimizer() if _sched else stand_in(), **args)

        name, error = _culprit(build, kwargs)
        if error is None:
            if not is_scheduler:  # schedulers are checked against the configured optimiser
                def optimizer(_cls: Any = cls, _args: dict = kwargs) -> torch.optim.Optimizer:
                    return _cls(stand_in(), **_args)
            continue
        if name is None:
            raise ConfigurationError(f"{_field(key)}={class_path!r} is not allowed with these "
                                     f"arguments: {_first_line(error)}") from error
        raise ConfigurationError(f"{_field(key)}.{name}={kwargs[name]!r} is not allowed: "
                                 f"expected a value {class_path} accepts "
                                 f"({_first_line(error)})") from error


def trainer_error_line(exc: BaseException, trainer_args: Any) -> str:
    """One line naming the Trainer argument that Lightning refused, from its message."""
    message = _first_line(exc)
    must = _MUST.search(message)
    if must and must.group(1) in trainer_args:
        key = must.group(1)
        return f"trainer.{key}={trainer_args[key]!r} is not allowed: expected {must.group(2)}"
    named = [match.group(1) or match.group(2) for match in _NAMED.finditer(message)]
    # then argument names with an underscore (too specific to be a plain word: val_check_interval)
    named += [word for word in re.findall(r"\b[a-z]+_\w+\b", message) if word not in named]
    key = next((name for name in named if name in trainer_args), None)
    if key is None:  # the one argument whose value the message quotes ("No supported gpu …")
        quoted = [name for name, value in trainer_args.items()
                  if isinstance(value, (str, int, float)) and not isinstance(value, bool)
                  and re.search(rf"(?<![\w.-]){re.escape(str(value))}(?![\w.])", message)]
        key = quoted[0] if len(quoted) == 1 else None
    if key is not None:
        return f"trainer.{key}={trainer_args[key]!r} is not allowed: {message}"
    return f"trainer: {message}"
