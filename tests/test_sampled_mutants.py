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


def test_wilcoxon_notes_define_each_column_the_report_shows():
    """The notes under the Table 5 report define its p-values; a reader relies on these sentences."""
    from nodulekit.stats import wilcoxon_notes

    text = wilcoxon_notes(n_resamples=2000, seed=0, n_permutations=10000)
    assert (
        "`prob_p_value`: the paper's Table 5 test, a Wilcoxon signed-rank test of the probabilities (a small p"
        " says the output distributions differ, not that either run is better; nodule level, patients not"
        " accounted for). `*_holm`: Holm's adjustment over the comparisons of the first arm with the others."
    ) in text
    assert "(10000 random sign patterns, or all when fewer; seed 0)" in text
