from pathlib import Path

from forge.config import reference_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_is_complete_and_current():
    text = README.read_text()
    start = text.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end] == reference_markdown(), "regenerate with: forge config --reference"
