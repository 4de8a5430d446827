"""One validation message format: ``field=value is not allowed: expected …``."""

from __future__ import annotations

import math

import pytest

from ilvae.errors import ConfigurationError, check, check_number


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
