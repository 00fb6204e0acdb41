"""Package structure: imports run one way (no cycle among sharpfast's modules, counting imports
inside functions too), `import sharpfast` gives every documented name, and library code never
exits the interpreter (only the CLI turns errors into exit codes)."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "sharpfast"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set:
    """sharpfast modules imported anywhere in the file (module level or inside functions); the
    root facade `import sharpfast` (lazy attributes) is not an edge."""
    name = module_name(path)
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("sharpfast"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` imports module x
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sharpfast."))
    return out


def graph():
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    # an import of one's own parent package is not an edge (the parent is already being imported)
    ancestors = lambda m: {".".join(m.split(".")[:k]) for k in range(1, m.count(".") + 1)}  # noqa: E731
    edges = {m: {d for d in imports_of(p) if d in files and d != m and d not in ancestors(m)}
             for m, p in files.items()}
    return edges


def find_cycle(edges):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def test_no_import_cycles():
    edges = graph()
    assert len(edges) > 20
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(edges) == ["a", "b", "c", "a"]


def _exits(tree) -> list:
    """Lines that raise SystemExit or call sys.exit outside an `if __name__ == "__main__":` block."""
    main_blocks = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            main_blocks.update(id(n) for n in ast.walk(node))
    bad = []
    for node in ast.walk(tree):
        if id(node) in main_blocks:
            continue
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit", "quit"):
            bad.append(node.lineno)
        if isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.unparse(node.exc):
            bad.append(node.lineno)
    return bad


def test_library_code_never_exits():
    """SystemExit / sys.exit only where a module runs as a program, and in `python -m sharpfast`."""
    for p in PKG.rglob("*.py"):
        if module_name(p) == "sharpfast.__main__":
            continue
        bad = _exits(ast.parse(p.read_text(encoding="utf-8")))
        assert not bad, f"{p} exits the interpreter at lines {bad}"
    assert _exits(ast.parse("def f():\n    raise SystemExit('x')\n")) == [2], "the check sees an exit"


def test_plain_import_gives_every_documented_name():
    code = ("import sharpfast\n"
            "for name in ('detect', 'sail', 'guard', 'scan', 'evaluate', 'calibrate', 'hessian_spectrum', 'zoo', "
            "'errors', 'ops'):\n"
            "    getattr(sharpfast, name)\n"
            "assert callable(sharpfast.zoo.load)\n"
            "assert issubclass(sharpfast.errors.BadArgument, ValueError)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_the_prompt_sets_ship_as_written():
    """The public prompt sets are package data, each caption exactly as published (odd spaces kept)."""
    from sharpfast import data
    from sharpfast.errors import BadArgument

    sets = {n: data.prompt_set(n) for n in data.PROMPT_SETS}
    assert [len(v) for v in sets.values()] == [500, 219, 500]
    assert any("  " in p for p in sets["sd1_memorized"]), "a caption's own spacing must be kept"
    assert not set(sets["sd1_memorized"]) & set(sets["non_memorized"])
    import pytest

    with pytest.raises(BadArgument, match="sd1_memorized"):
        data.prompt_set("sd3_memorized")
