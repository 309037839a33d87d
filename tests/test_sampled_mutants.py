"""Tests for the survivors of the whole package's mutant sample (tools/mutant_sample.py, seed 1;
docs/testing.md): each names the property the surviving mutant broke, checked against a
known answer written here."""

from __future__ import annotations

import pytest

from nodulekit.errors import NodulekitError


def test_a_map_method_refused_names_the_models_class_when_it_has_no_arch():
    """A model without an ``arch`` (any torch module) is named by its class in the refusal."""
    import torch

    from nodulekit.map_methods import check_method

    with pytest.raises(NodulekitError) as err:
        check_method(torch.nn.Linear(2, 2), "hesam")
    assert str(err.value).startswith("method 'hesam' does not apply to model 'Linear': ")
    assert str(err.value).endswith("; it supports: none")
