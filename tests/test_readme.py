"""Every ```python block of README.md and of the documentation site (docs/*.md) runs as written,
each on its own in a fresh interpreter (a snippet that uses a name it never defines fails here)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page, code) for page in PAGES
          for code in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)]


def test_there_are_snippets():
    assert sum(1 for page, _ in BLOCKS if page.name == "README.md") >= 1
    assert len(BLOCKS) >= 8


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


@pytest.mark.parametrize("page, code", BLOCKS,
                         ids=[f"{page.stem}-block{i}" for i, (page, _) in enumerate(BLOCKS)])
def test_python_block_runs(page, code, tmp_path):
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{page.name} snippet failed:\n{code}\n--- stderr ---\n{res.stderr[-3000:]}"
