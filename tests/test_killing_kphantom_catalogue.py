"""`nodulekit models`' catalogue (its records and Markdown table) and the escaping of untrusted
text for the terminal, character class by character class, at the edges of each range."""

from __future__ import annotations

import pytest

from nodulekit.catalogue import catalogue_markdown, model_catalogue
from nodulekit.printing import printable


def test_catalogue_markdown_table():
    rows = [
        {"name": "a", "paper_name": "Ours-A", "map_methods": ["sam", "gradcam"], "parameters": 1234567,
         "description": "first", "in_channels": 3},
        {"name": "b", "paper_name": "", "map_methods": [], "parameters": 12, "description": "alias of a: x",
         "in_channels": 3},
    ]  # fmt: skip
    assert catalogue_markdown(rows) == (
        "| name | paper name | map methods | parameters (3 channels) | description |\n"
        "|---|---|---|---|---|\n"
        "| a | Ours-A | sam, gradcam | 1,234,567 | first |\n"
        "| b | – |  | 12 | alias of a: x |\n"
    )
    assert catalogue_markdown([]).startswith("| name | paper name | map methods | parameters (? channels) |")


def test_catalogue_records_carry_the_registry_description_and_map_kind(monkeypatch):
    """(test_cli checks names, paper names, methods and sizes of the whole registry.)"""
    import nodulekit.models as models
    from nodulekit.maps import supported_methods

    monkeypatch.setattr(models, "describe_models", lambda: [("sag-c", "the desc", "kind-x"), ("sam", "alias", None)])
    rows = model_catalogue(in_channels=5)
    assert [r["name"] for r in rows] == ["sag-c", "sam"]
    assert rows[0] == {
        "name": "sag-c", "paper_name": rows[0]["paper_name"], "description": "the desc", "map_kind": "kind-x",
        "map_methods": supported_methods(models.create_model("sag-c", 5)), "in_channels": 5,
        "parameters": sum(p.numel() for p in models.create_model("sag-c", 5).parameters()),
    }  # fmt: skip
    assert rows[1]["map_kind"] is None and rows[1]["paper_name"] == "Ours-SAM" and rows[1]["in_channels"] == 5
    assert type(rows[0]["parameters"]) is int


@pytest.mark.parametrize(
    ("char", "escaped"),
    [("\x00", "\\x00"), ("\x08", "\\x08"), ("\x0b", "\\x0b"), ("\x1f", "\\x1f"), ("\x7f", "\\x7f"), ("\x9f", "\\x9f"),
     ("\u200b", "\\u200b"), ("\u200f", "\\u200f"), ("\u2028", "\\u2028"), ("\u202e", "\\u202e"),
     ("\u2060", "\\u2060"), ("\u2069", "\\u2069"), ("\ufeff", "\\ufeff"), ("\ud800", "\\ud800"),
     ("\udfff", "\\udfff")],
)  # fmt: skip
def test_control_and_invisible_characters_are_escaped(char, escaped):
    assert printable(f"a{char}b") == f"a{escaped}b"
    assert printable(f"a{char}b", lines=False) == f"a{escaped}b"


@pytest.mark.parametrize("char", [" ", "~", "\xa0", "é", "\u200a", "\u2010", "\u2027", "\u202f", "\u205f", "\u206a",
                                  "\ufefe", "\uff00", "\U0001f600"])  # fmt: skip
def test_printable_characters_next_to_the_ranges_are_kept(char):
    assert printable(f"a{char}b") == f"a{char}b" == printable(f"a{char}b", lines=False)


def test_line_breaks_and_tabs_are_kept_only_for_multi_line_text():
    assert printable("a\nb\tc") == "a\nb\tc"
    assert printable("a\nb\tc", lines=False) == "a\\x0ab\\x09c"
    assert printable(12) == "12" and printable(None, lines=False) == "None"
