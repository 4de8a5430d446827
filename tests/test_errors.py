"""One validation message format: ``field=value is not allowed: expected …``."""

from __future__ import annotations

import ast
import importlib
import math
import re
from pathlib import Path

import pytest

from ilvae.errors import ConfigurationError, check, check_int, check_number


def test_check_raises_the_one_message_format():
    with pytest.raises(ConfigurationError) as info:
        check("model.num_components", 0, "a positive integer")
    assert str(info.value) == "model.num_components=0 is not allowed: expected a positive integer"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("value", "strict", "message"), [
    (-1.0, False, "beta=-1.0 is not allowed: expected a finite number >= 0"),
    (0, True, "beta=0 is not allowed: expected a finite number > 0"),
    (math.inf, False, "beta=inf is not allowed: expected a finite number >= 0"),
    (True, False, "beta=True is not allowed: expected a finite number >= 0"),
    ("1", False, "beta='1' is not allowed: expected a finite number >= 0"),
])
def test_check_number_refuses_with_the_field_and_the_allowed_range(value, strict, message):
    with pytest.raises(ConfigurationError) as info:
        check_number("beta", value, strict=strict)
    assert str(info.value) == message


def test_check_number_returns_a_float_at_and_above_the_minimum():
    assert check_number("L", 0) == 0.0 and isinstance(check_number("L", 0), float)
    assert check_number("L", 2.5, minimum=1.0, strict=True) == 2.5


@pytest.mark.parametrize(("value", "minimum", "message"), [
    (0, 1, "every_n_epochs=0 is not allowed: expected an integer >= 1"),
    (2.0, 1, "every_n_epochs=2.0 is not allowed: expected an integer >= 1"),
    (True, 0, "every_n_epochs=True is not allowed: expected an integer >= 0"),
    (1, 2, "every_n_epochs=1 is not allowed: expected an integer >= 2"),
])
def test_check_int_refuses_non_integers_and_values_below_the_minimum(value, minimum, message):
    with pytest.raises(ConfigurationError) as info:
        check_int("every_n_epochs", value, minimum)
    assert str(info.value) == message


def test_check_int_returns_an_int_at_and_above_the_minimum():
    assert check_int("seed", 0, 0) == 0 and check_int("batch_size", 7) == 7


@pytest.mark.parametrize(("value", "interval"), [
    (1.0, "[0, 1)"), (-0.1, "[0, 1)"), (math.nan, "[0, 1)"),
])
def test_check_number_with_a_maximum_names_the_interval(value, interval):
    with pytest.raises(ConfigurationError) as info:
        check_number("val_fraction", value, maximum=1.0, strict_maximum=True)
    assert str(info.value) == (f"val_fraction={value!r} is not allowed: expected a number in "
                               f"{interval}")
    assert check_number("val_fraction", 0.999, maximum=1.0, strict_maximum=True) == 0.999
    assert check_number("p", 1, strict=True, maximum=1.0) == 1.0


# --------------------------------------------------- every package check uses the one format
# (class, arguments with one bad value, the field the message must name)
BAD_CONFIGURATIONS = [
    ("ilvae.callbacks.CollapseMonitor", {"every_n_epochs": 0}, "every_n_epochs"),
    ("ilvae.callbacks.CollapseMonitor", {"num_iw_samples": 0}, "num_iw_samples"),
    ("ilvae.callbacks.KLAnnealing", {"length": 0}, "length"),
    ("ilvae.callbacks.TargetKLController", {"kl_target": 1.0, "sign": 2}, "sign"),
    ("ilvae.callbacks.FID", {"num_samples": 1}, "num_samples"),
    ("ilvae.callbacks.FID", {"stage": "nope"}, "stage"),
    ("ilvae.callbacks.ImageLogger", {"num_images": 0}, "num_images"),
    ("ilvae.callbacks.LatentPlot", {"every_n_epochs": -1}, "every_n_epochs"),
    ("ilvae.callbacks.LinearTheoryMonitor", {"eps": 0.0}, "eps"),
    ("ilvae.decoders.MLPDecoder", {"latent_dim": 0, "data_dim": 4}, "latent_dim"),
    ("ilvae.decoders.LipschitzDecoder", {"latent_dim": 2, "data_dim": 4, "K": -1.0}, "K"),
    ("ilvae.decoders.ILBrenierDecoder", {"latent_dim": 3, "data_dim": 2}, "data_dim"),
    ("ilvae.decoders.icnn.ICNN", {"input_dim": 3, "hidden": [4], "negative_slope": 2.0},
     "negative_slope"),
    ("ilvae.encoders.MLPEncoder", {"data_shape": (4,), "latent_dim": 2, "activation": "swish"},
     "activation"),
    ("ilvae.loss_guard.LossGuard", {"action": "ignore"}, "action"),
    ("ilvae.datamodules.TwoGaussians", {"sigma": 0.0}, "sigma"),
    ("ilvae.datamodules.TwoGaussians", {"val_fraction": 1.0}, "val_fraction"),
    ("ilvae.datamodules.TwoGaussians", {"drop_last": 1}, "drop_last"),
    ("ilvae.datamodules.LinearGaussianData", {"spectrum": [1.0], "num_samples": 1},
     "num_samples"),
    ("ilvae.datamodules.Digits", {"test_fraction": 1.0}, "test_fraction"),
    ("ilvae.datamodules.MNIST", {"root": "data", "download": "yes"}, "download"),
    ("ilvae.datamodules.TextDataModule", {"train_path": None, "long_sentences": "cut"},
     "long_sentences"),
    ("ilvae.metrics.ImportanceWeightedNLL", {"num_samples": 0}, "num_samples"),
    ("ilvae.metrics.MutualInformation", {"chunk_size": 0}, "chunk_size"),
    ("ilvae.metrics.ClusterAccuracy", {"num_clusters": 2.5}, "num_clusters"),
    ("ilvae.metrics.EpsilonCollapse", {"delta": 1.0}, "delta"),
    ("ilvae.metrics.ActiveUnits", {"threshold": -1.0}, "threshold"),
]


@pytest.mark.parametrize(("class_path", "kwargs", "field"), BAD_CONFIGURATIONS,
                         ids=[f"{c.rpartition('.')[2]}-{f}" for c, _, f in BAD_CONFIGURATIONS])
def test_configuration_checks_across_the_package_use_the_one_format(class_path, kwargs, field):
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigurationError) as info:
        cls(**kwargs)
    message = str(info.value)
    # independent of the helpers: the message itself, read as text
    assert re.fullmatch(rf"{re.escape(field)}=.+ is not allowed: expected \S.*", message), message
    assert "\n" not in message


# The wordings the one format replaced, as they appeared in raise statements.
_OLD_WORDING = re.compile(r"must be (>|>=|an? (positive |non-negative )?(integer|number)|"
                          r"one of|true or false)|is unknown; choose", re.IGNORECASE)


def test_no_raise_in_the_package_uses_an_old_message_wording():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("ilvae", "callbacks", "datamodules"):
        for path in sorted((root / folder).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Raise) and node.exc is not None:
                    text = ast.get_source_segment(source, node.exc) or ""
                    if _OLD_WORDING.search(text):
                        offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_the_wording_scan_finds_an_old_message():
    source = 'def f(n):\n    raise ValueError(f"n must be >= 1, got {n}")\n'
    raises = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Raise)]
    assert _OLD_WORDING.search(ast.get_source_segment(source, raises[0].exc))
