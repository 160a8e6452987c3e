"""String enums of the Kronecker family."""

from __future__ import annotations

import pytest

from curvops.kronecker.options import FallbackType, FisherType, KFACType, parse_enum


def test_enums_accept_strings_and_members():
    assert parse_enum("mc", FisherType, "fisher_type") is FisherType.MC
    assert parse_enum(KFACType.REDUCE, KFACType, "kfac_approx") is KFACType.REDUCE
    assert FisherType.FORWARD_ONLY == "forward-only"
    assert FallbackType("diagonal") is FallbackType.DIAGONAL


def test_unknown_value_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"Unknown fisher_type='ggn'. Use one of 'type-2', 'mc'"):
        parse_enum("ggn", FisherType, "fisher_type")
