"""Every ```python block of README.md and of the documentation site (docs/*.md) runs as written,
each on its own in a process of its own with none of the tests' or other snippets' names (a snippet
that uses a name it never defines fails here), forked from a server that has imported torch and
diffusers once (helpers.run_snippet)."""
import re
from pathlib import Path

import pytest
from helpers import run_snippet

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
    rc, output = run_snippet(code, tmp_path)
    assert rc == 0, f"{page.name} snippet failed (exit {rc}):\n{code}\n--- output ---\n{output[-3000:]}"


def test_a_failing_snippet_fails_and_names_are_not_shared(tmp_path):
    rc, out = run_snippet("import sharpfast\nprint('ran in', __name__)\nundefined_name", tmp_path)
    assert rc == 1 and "ran in __main__" in out and "NameError" in out
    rc, out = run_snippet("print(sorted(k for k in globals() if not k.startswith('__')))", tmp_path)
    assert rc == 0 and "[]" in out, out
