"""The ``ilvae`` command: LightningCLI (fit/validate/test/predict) plus ``ilvae decoders``.

    ilvae fit --config configs/quickstart.yaml
    ilvae fit --config configs/quickstart.yaml --model.decoder=il_brenier --model.decoder.L=2
    ilvae fit --config configs/quickstart.yaml --ckpt_path=last      # resume the latest run
    ilvae decoders                                                   # registered decoders

Model and data use LightningCLI's subclass mode (``--model=VAE``, ``--data=ArrayDataModule``).
The data shape is linked from the datamodule into the model, so users never give sizes to a
decoder. Registered decoder names are accepted wherever a decoder class is expected.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import set_loader
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from ilvae import registry
from ilvae.checkpointing import AtomicCheckpointIO, check_checkpoint, has_checkpoint_io
from ilvae.errors import (
    SETUP_ERRORS,
    ConfigurationError,
    NonFiniteLossError,
    check_optimizers,
    trainer_error_line,
)
from ilvae.loggers import how_to_view, run_directory

_PARSER_MODE = "ilvae_yaml"
_STATE = {"running": False}
_DECODER_KEYS = ("--model.decoder", "--model.init_args.decoder")


def _decoder_class_path(name: Any) -> Any:
    """Full class path for a registered decoder name (or a plugin's class name)."""
    if not isinstance(name, str) or "." in name:
        return name
    try:
        cls = registry.resolve(name)
    except ValueError:
        return name
    return f"{cls.__module__}.{cls.__qualname__}"


def _rewrite_decoders(node: Any) -> Any:
    """Replace registered decoder names under every ``decoder`` key of a loaded config."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "decoder":
                if isinstance(value, str):
                    value = _decoder_class_path(value)
                elif isinstance(value, dict) and "class_path" in value:
                    value = {**value, "class_path": _decoder_class_path(value["class_path"])}
            out[key] = _rewrite_decoders(value)
        return out
    if isinstance(node, list):
        return [_rewrite_decoders(v) for v in node]
    return node


def _yaml_loader(text: str) -> Any:
    return _rewrite_decoders(yaml.safe_load(text))


set_loader(_PARSER_MODE, _yaml_loader, exceptions=(yaml.YAMLError,))


def rewrite_argv(args: list[str]) -> list[str]:
    """Map ``--model.decoder=NAME`` (and ``.class_path``) from a registered name to its class."""
    out: list[str] = []
    i = 0
    keys = _DECODER_KEYS + tuple(k + ".class_path" for k in _DECODER_KEYS)
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if key in keys and eq:
            arg = f"{key}={_decoder_class_path(value)}"
        elif arg in keys and i + 1 < len(args):
            out += [arg, _decoder_class_path(args[i + 1])]
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def find_last_checkpoint(root: str | os.PathLike) -> str | None:
    """Newest ``last*.ckpt`` under ``root`` (any run version), or None."""
    candidates = [p for p in Path(root).rglob("last*.ckpt") if p.is_file()]
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None


def next_run_dir(root: str | os.PathLike) -> str:
    """``root/lightning_logs/version_N``, N one past the highest existing version: the folder
    Lightning's TensorBoard logger gives the next run, here for a run without a logger."""
    base = os.path.join(str(root), "lightning_logs")
    fs = get_filesystem(base)
    versions = [-1]
    if fs.isdir(base):
        for entry in fs.listdir(base, detail=False):
            name = os.path.basename(str(entry).rstrip("/"))
            if name.startswith("version_") and name[len("version_"):].isdigit():
                versions.append(int(name[len("version_"):]))
    return os.path.join(base, f"version_{max(versions) + 1}")


def _section(config: Any) -> Any:
    """The part of a parsed configuration for the subcommand being run."""
    subcommand = config.get("subcommand")
    return config[subcommand] if subcommand else config


class SaveRunConfig(SaveConfigCallback):
    """Writes ``config.yaml`` into the run directory (:func:`ilvae.loggers.run_directory`), a
    folder of its own for every logger: Lightning's default, ``trainer.log_dir``, is the shared
    store of an MLflow or W&B logger (the next run would find the file there), or None for an
    MLflow database. An existing file is never overwritten."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        directory = run_directory(trainer)
        path = os.path.join(directory, self.config_filename)
        fs = get_filesystem(directory)
        if fs.isfile(path) and not self.overwrite:
            raise ConfigurationError(f"{path} exists already: a run directory is never reused")
        fs.makedirs(directory, exist_ok=True)
        self.parser.save(self.config, path, skip_none=False, overwrite=self.overwrite,
                         multifile=self.multifile)


class ILVAECLI(LightningCLI):
    """LightningCLI with the data shape linked into the model and run-directory handling.

    Built on LightningCLI's public hooks only: ``parse_arguments`` (checkpoint file check),
    ``before_instantiate_classes`` (``--ckpt_path=last``, optimiser arguments),
    ``instantiate_trainer`` (checkpointing, run folders, Trainer arguments) and the
    ``before_<subcommand>``/``after_fit`` hooks (checks on the built model and data, summary).
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        from ilvae.callbacks.denormals import FlushDenormals
        from ilvae.callbacks.fault_tolerance import NonFiniteLossGuard
        from ilvae.callbacks.summary import RunSummary

        parser.link_arguments("data.data_shape", "model.init_args.data_shape",
                              apply_on="instantiate")
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size",
                              apply_on="instantiate")
        parser.link_arguments("data.target_shape", "model.init_args.target_shape",
                              apply_on="instantiate")
        # Always on; `--nonfinite.action=skip` skips non-finite batches instead of stopping.
        parser.add_lightning_class_args(NonFiniteLossGuard, "nonfinite")
        # Always on; `--denormals.flush=false` keeps subnormal floats on the CPU.
        parser.add_lightning_class_args(FlushDenormals, "denormals")
        # Always on; prints the final collapse metrics and writes summary.json in the run
        # directory at the end of fit/validate/test (`--summary.enabled=false` turns it off).
        parser.add_lightning_class_args(RunSummary, "summary")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the checkpoint's hyper-parameters right after parsing, before any
        # hook: check the file first so that a bad one gets a clear error naming it.
        self._check_ckpt_path(_section(self.config))

    def before_instantiate_classes(self) -> None:
        config = _section(self.config)
        if self.subcommand == "fit":
            check_optimizers(config)
        # Lightning looks for "last" only in the new run's (empty) checkpoint folder; a user
        # resuming means the latest run under the root directory.
        if config.get("ckpt_path") == "last":
            root = config.trainer.default_root_dir or os.getcwd()
            found = find_last_checkpoint(root)
            if found is None:
                raise ConfigurationError(f"ckpt_path='last': no last*.ckpt found under {root}")
            config.ckpt_path = found
            print(f"ilvae: resuming from {found}", file=sys.stderr)
        self._check_ckpt_path(config)

    def _check_ckpt_path(self, config: Any) -> None:
        """Refuse a missing, corrupted, truncated or untrusted ``ckpt_path`` before anything
        runs. Checkpoints may come from others, so they are loaded with tensors and plain
        containers only unless the user trusts the file (``--weights_only=false``)."""
        if "weights_only" in config and config.get("weights_only") is None:
            config.weights_only = True
        ckpt = config.get("ckpt_path")
        if not ckpt or ckpt in ("best", "last", "hpc") or str(ckpt).startswith("registry"):
            return
        if getattr(self, "_checked_ckpt", (None,))[0] == ckpt:
            return
        checkpoint = check_checkpoint(ckpt, config.get("weights_only", True))
        self._checked_ckpt = (ckpt, checkpoint.get("hyper_parameters") or {})

    def _check_model_and_data(self) -> None:
        """Checks that need the instantiated model and data, before anything is written."""
        model, datamodule = self.model, self.datamodule
        hparams = getattr(self, "_checked_ckpt", (None, {}))[1]
        saved = hparams.get("data_shape")
        current = getattr(model, "data_shape", None)
        if saved is not None and current is not None and tuple(saved) != tuple(current):
            ckpt = self.config_init[self.subcommand].get("ckpt_path")
            raise ConfigurationError(
                f"ckpt_path={ckpt!r} was trained on data_shape {tuple(saved)}, but the data "
                f"have data_shape {tuple(current)}: use the data it was trained on"
            )
        if self.subcommand != "fit" or datamodule is None:
            return
        try:
            datamodule.setup("fit")
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(str(exc)) from exc
        # A model with its own on_fit_start checks its data there (and may need other batches).
        from ilvae.models.base import LatentVariableModel

        if isinstance(model, LatentVariableModel) and (
                type(model).on_fit_start is LatentVariableModel.on_fit_start
                or type(model).check_data is not LatentVariableModel.check_data):
            model.check_data(datamodule)

    def _preflight(self) -> None:
        self._check_model_and_data()
        # From here on errors come from running the subcommand, not from the configuration.
        _STATE["running"] = True

    def before_fit(self) -> None:
        self._preflight()

    def before_validate(self) -> None:
        self._preflight()

    def before_test(self) -> None:
        self._preflight()

    def before_predict(self) -> None:
        self._preflight()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = {**(_section(self.config_init).get("trainer") or {}), **kwargs}
        # Atomic checkpoint writes unless the configuration names its own CheckpointIO.
        plugins = config.get("plugins")
        if not has_checkpoint_io(plugins):
            plugins = [] if plugins is None else list(plugins) if isinstance(
                plugins, (list, tuple)) else [plugins]
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        # `last.ckpt` is always kept (for --ckpt_path=last), unless checkpointing is off.
        if config.get("enable_checkpointing") is not False:
            callbacks = config.get("callbacks")
            callbacks = [] if callbacks is None else list(callbacks) if isinstance(
                callbacks, (list, tuple)) else [callbacks]
            kwargs["callbacks"] = [*callbacks, ModelCheckpoint(save_last=True)]
        # Without a logger Lightning writes a run's config and checkpoints straight into the
        # root directory, where the next such run would collide with them: each run gets its
        # own folder instead, numbered like the logger's (the saved config keeps the root).
        if config.get("logger") is False or config.get("logger") == []:
            kwargs["default_root_dir"] = next_run_dir(config.get("default_root_dir")
                                                      or os.getcwd())
        try:
            return super().instantiate_trainer(**kwargs)
        except SETUP_ERRORS as exc:
            raise ConfigurationError(trainer_error_line(exc, config)) from exc

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.is_global_zero:
            print(f"ilvae: run directory: {run_directory(trainer)}")
            dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
            if dirpath and get_filesystem(dirpath).isdir(dirpath):
                print(f"ilvae: checkpoints: {dirpath}")
            for logger in trainer.loggers:  # how to look at this run with each of its loggers
                hint = how_to_view(logger)
                if hint is not None:
                    print(f"ilvae: {hint}")


def _trainer_defaults() -> dict[str, Any]:
    from ilvae.callbacks.fault_tolerance import RandomStateCheckpoint

    # ModelCheckpoint(save_last=True) is added by ILVAECLI.instantiate_trainer when
    # checkpointing is on.
    return {"callbacks": [RandomStateCheckpoint()]}


def list_decoders(stream: Any = None) -> int:
    """Print every registered decoder: name, class, providing distribution (or its error)."""
    stream = sys.stdout if stream is None else stream
    rows = [("name", "class", "distribution")]
    for plugin in registry.plugins().values():
        what = plugin.value.replace(":", ".") if plugin.error is None else f"BROKEN: {plugin.error}"
        rows.append((plugin.name, what, plugin.distribution))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for name, cls, dist in rows:
        print(f"{name:<{widths[0]}}  {cls:<{widths[1]}}  {dist}", file=stream)
    return 0


def user_error_line(exc: BaseException) -> str:
    """One line for a configuration error; jsonargparse nests the real cause in a list."""
    text = str(exc)
    causes = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
    causes = [c for c in causes if not c.startswith("Expected a <class 'NoneType'>")]
    line = causes[0] if causes else text.strip().splitlines()[0] if text.strip() else repr(exc)
    return line


_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_UNKNOWN = (re.compile(r"Expected a path but (.+?) either not accessible or invalid"),
            re.compile(r"Expected a dot import path string: (\S+)"))
_EXPECTED = re.compile(r"Expected a <class '(\w+)'>(?:\. Got value: (.+?)(?:\. Got value: |$))?",
                       re.MULTILINE)
_GIVEN = re.compile(r"^\s*Given value: (.+)$", re.MULTILINE)
_NOT_ACCEPTED = re.compile(r"Option '(\w+)' is not accepted")
_REQUIRED = re.compile(r"given class_path '([\w.]+)':\s+the following arguments are required: "
                       r"([\w, ]+)")
_CLASS_PATH = re.compile(r"class_path='([\w.]+)'")
_TYPE_WORDS = {"float": "a finite number", "int": "an integer", "bool": "true or false",
               "str": "a string"}


def _known_names(field: str) -> str:
    """The choices for a class-valued field, for an 'unknown name' message."""
    last = field.rsplit(".", 1)[-1]
    if last == "decoder":
        return ", ".join(registry.plugins()) + " (registered decoders)"
    import ilvae.datamodules as datamodules
    import ilvae.models as models
    from ilvae.encoders import Encoder
    from ilvae.priors import Prior

    def public(base: type) -> list[str]:
        seen, todo = [], list(base.__subclasses__())
        while todo:
            cls = todo.pop(0)
            todo += cls.__subclasses__()
            if not cls.__name__.startswith("_") and cls.__name__ not in seen:
                seen.append(cls.__name__)
        return seen

    table = {"prior": public(Prior), "encoder": public(Encoder),
             "model": [n for n in models.__all__ if n != "LatentVariableModel"],
             "data": [n for n in datamodules.__all__ if n != "VAEDataModule"]}
    return ", ".join(table.get(last, [])) or "a class path"


def _options(class_path: str) -> str:
    """The constructor arguments a user may set on ``class_path`` (sizes are supplied)."""
    import inspect

    from ilvae._config import import_class

    try:
        parameters = inspect.signature(import_class(class_path).__init__).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return "see its documentation"
    supplied = {"self", "latent_dim", "data_dim", "data_shape"}
    return ", ".join(n for n, p in parameters.items() if n not in supplied
                     and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)) or "none"


def argument_error_line(exc: BaseException) -> str:
    """One line naming the field, the value and what is allowed, from a jsonargparse error."""
    text = str(exc)
    field = ".".join(_PARSER_KEY.findall(text))
    for pattern in _UNKNOWN:
        match = pattern.search(text)
        if match and field:
            return (f"{field}={match.group(1)!r} is not allowed: expected one of "
                    f"{_known_names(field)}, or a class path 'package.module.Class'")
    required = _REQUIRED.search(text)
    if required and field:  # e.g. --trainer.logger=CSVLogger without its save_dir
        name = required.group(2).split(",")[0].strip()
        return (f"{field}.{name} is required by {required.group(1).rsplit('.', 1)[-1]}: "
                f"add --{field}.{name}=…")
    option = _NOT_ACCEPTED.search(text)
    if option and field:
        owner = _CLASS_PATH.search(text)
        return (f"{field}.{option.group(1)} is not an option"
                + (f" of {owner.group(1)}; its options: {_options(owner.group(1))}"
                   if owner else ""))
    expected = [m for m in _EXPECTED.finditer(text) if m.group(1) != "NoneType"]
    if expected and field:
        kind = expected[0].group(1)
        value = expected[0].group(2)
        if value is None:
            given = _GIVEN.search(text)
            value = given.group(1).strip() if given else "?"
        return (f"{field}={value!r} is not allowed: expected "
                f"{_TYPE_WORDS.get(kind, 'a ' + kind)}")
    return user_error_line(exc)


def _debug() -> bool:
    return os.environ.get("ILVAE_DEBUG", "") not in ("", "0")


def run(args: list[str] | None = None) -> ILVAECLI:
    """Run the LightningCLI on ``args`` (default ``sys.argv[1:]``)."""
    import ilvae.datamodules  # noqa: F401  (registers datamodule subclasses for short names)
    import ilvae.models  # noqa: F401
    from ilvae.datamodules.base import VAEDataModule

    registry.plugins()  # imports every plugin, so class names resolve too
    registry.warn_broken()
    args = rewrite_argv(list(sys.argv[1:] if args is None else args))
    return ILVAECLI(
        LightningModule,
        VAEDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        trainer_defaults=_trainer_defaults(),
        parser_kwargs={"parser_mode": _PARSER_MODE, "exit_on_error": False},
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": False, "save_to_log_dir": False},
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # The command line reaches LightningCLI as `args` (after decoder names are resolved),
        # which it would otherwise warn about on every run.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["decoders"]:
        return list_decoders()
    if argv[:1] == ["reproduce"]:
        from ilvae import reproduce

        return reproduce.main(argv[1:])
    if argv[:1] == ["fid-classifier"]:
        from ilvae import fid_classifier

        return fid_classifier.main(argv[1:])
    if argv[:1] == ["sweep"]:
        from ilvae import sweep

        return sweep.main(argv[1:])
    _STATE["running"] = False
    try:
        run(argv)
    except argparse.ArgumentError as exc:
        if _debug():
            traceback.print_exc()
        print(f"ilvae: error: {argument_error_line(exc)}", file=sys.stderr)
        print("ilvae: (set ILVAE_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        if _debug():
            traceback.print_exc()
        print(f"ilvae: error: {exc}", file=sys.stderr)
        print("ilvae: rerun with --nonfinite.action=skip to skip such batches instead",
              file=sys.stderr)
        return 3
    except (ConfigurationError, ValueError, TypeError, FileNotFoundError) as exc:
        if _STATE["running"] and not isinstance(exc, ConfigurationError):
            raise
        if _debug():
            traceback.print_exc()
        print(f"ilvae: error: {user_error_line(exc)}", file=sys.stderr)
        print("ilvae: (set ILVAE_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
