"""tests/golden.py: a text equal to its reviewed file passes, any changed word fails with a diff."""

import pytest

from tests import golden


def test_a_text_passes_only_when_equal_to_its_reviewed_file(tmp_path, monkeypatch):
    monkeypatch.setattr(golden, "GOLDEN", tmp_path)
    monkeypatch.delenv("NODULEKIT_UPDATE_GOLDEN", raising=False)
    (tmp_path / "report.md").write_text("# Title\nAUC 0.81 [0.74, 0.88]\n")
    golden.assert_golden("report.md", "# Title\nAUC 0.81 [0.74, 0.88]\n")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)-AUC 0.81.*\+AUC 0.18"):
        golden.assert_golden("report.md", "# Title\nAUC 0.18 [0.74, 0.88]\n")
    with pytest.raises(pytest.fail.Exception, match="missing"):
        golden.assert_golden("other.md", "text")


def test_update_mode_writes_the_file_it_then_compares_with(tmp_path, monkeypatch):
    monkeypatch.setattr(golden, "GOLDEN", tmp_path)
    monkeypatch.setenv("NODULEKIT_UPDATE_GOLDEN", "1")
    golden.assert_golden("sub/card.md", "new text\n")
    assert (tmp_path / "sub" / "card.md").read_text() == "new text\n"
