"""The design's rules, checked on the source. Each rule is a function of the package's files
({path relative to sharpfast/: text}) that lists its violations; each is run on the real tree
(no violation) and on a planted violation (found), so no rule guards nothing.

The rules: model families are adapter classes (no family branches elsewhere) and a family is
added by one class; the guard stays small and names no mitigation; one home for the sampling
defaults; library code raises sharpfast errors and never imports the CLI; every HTTP route is
defined once; no module over 450 lines, no function over 60; no two modules whose names differ by
a letter or a suffix; no private name imported from another module outside ops/; every reader of
the denoiser's call goes through the adapter's read_call; at least 80% of the functions fully
annotated, and mypy checks untyped bodies.
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "sharpfast"
ADAPTERS = "adapters/"        # the adapters: the one place that knows the families
BUILDERS = {"testing.py"}     # builds tiny pipelines of each family for the tests


def _tree() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in ROOT.rglob("*.py")}


TREE = _tree()


def _lines(files, skip=lambda path: False):
    for path, text in files.items():
        if skip(path):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            yield path, i, line


def _check(rule, planted: dict[str, str]):
    """The rule holds on the tree, and finds the planted violation."""
    assert not rule(TREE), f"{rule.__name__}:\n" + "\n".join(map(str, rule(TREE)))
    assert rule(planted), f"{rule.__name__} missed a planted violation: {planted}"


# ---- model families ----------------------------------------------------------------------------

FAMILY_BRANCH = re.compile(
    r"""\bfam(ily)?\s*(==|!=|\bin\b|\bnot in\b)\s*[("']|isinstance\(pipe,\s*\w*Pipeline|\.is_xl\b|"""
    r"""["'](StableDiffusion3?(XL)?|Flux)Pipeline["']|__name__\s*==\s*["']\w+Pipeline"""
)


def family_branches(files):
    outside = _lines(files, lambda p: p.startswith(ADAPTERS) or p in BUILDERS)
    return [f"{p}:{i}: {line.strip()}" for p, i, line in outside if FAMILY_BRANCH.search(line.split("#")[0])]


def test_no_family_branches_outside_the_adapters():
    _check(family_branches, {"guarding/x.py": 'if model.family == "flux":\n'})
    for line in ("if fam in ('sd3', 'flux'):", "isinstance(pipe, FluxPipeline)", "if model.is_xl:",
                 'names = ("StableDiffusionXLPipeline",)'):
        assert FAMILY_BRANCH.search(line), line
    assert not FAMILY_BRANCH.search("if m.supports(model):")


def test_a_new_family_is_one_class(monkeypatch):
    """A subclass that names a pipeline class serves it: ScoreModel(pipe) returns it, the
    mitigations' families list it, and nothing else is edited."""
    import sharpfast.adapters.base as score_base
    from sharpfast import mitigations
    from sharpfast.adapters import ScoreModel, StableDiffusionModel, adapter_class

    monkeypatch.setattr(score_base, "_ADAPTERS", dict(score_base._ADAPTERS))

    class MyPipeline:  # stands in for a diffusers pipeline class of a new family
        pass

    class MyModel(StableDiffusionModel):
        pipeline_class, family, cross_attention = "MyPipeline", "mine", False

    assert adapter_class(MyPipeline()) is MyModel
    assert "mine" in mitigations.get("transition").families          # needs cfg: has it
    assert "mine" not in mitigations.get("attention_rescale").families  # needs cross-attention: has not
    with pytest.raises(Exception, match="sharpfast supports"):
        ScoreModel(object())


CALL_READ = re.compile(r"""(kwargs(\.get\(|\[)\s*["'](timestep|sample|encoder_hidden_states|hidden_states)["'])""")


def call_readers(files):
    """Reading the denoiser's call arguments is the adapter's read_call, nowhere else."""
    return [f"{p}:{i}: {line.strip()}" for p, i, line in
            _lines(files, lambda p: p.startswith(ADAPTERS) or p in BUILDERS) if CALL_READ.search(line)]


def test_every_reader_of_the_denoisers_call_goes_through_read_call():
    _check(call_readers, {"mitigations/x.py": 't = kwargs["timestep"]\n'})


# ---- the guard ---------------------------------------------------------------------------------

def guard_size(files):
    tree = ast.parse(files["guarding/wrapper.py"])
    (guard,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Guard"]
    n = guard.end_lineno - guard.lineno + 1
    return [f"Guard is {n} lines"] if n >= 120 else []


def test_the_guard_is_small():
    _check(guard_size, {"guarding/wrapper.py": "class Guard:\n" + "    x = 1\n" * 130})


def _method_names():
    from sharpfast import catalog

    return set(catalog.MITIGATIONS) - {"none"}


def guard_names_a_method(files):
    """Nothing in the guard's package names a mitigation: each method declares what the guard
    needs of it (its registry entry), and the guard's defaults live in sharpfast.settings."""
    names = _method_names()
    hits = []
    for path, text in files.items():
        if not path.startswith("guarding/"):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                hits.append(f"{path}:{node.lineno}: {node.value!r}")
    return hits


def test_nothing_in_the_guard_names_a_method():
    _check(guard_names_a_method, {"guarding/regenerate.py": 'if m.name == "sail+transition":\n    pass\n'})


# ---- defaults, errors, imports -----------------------------------------------------------------

SAMPLING_DEFAULT = re.compile(r"(num_inference_steps|guidance_scale)\s*(:\s*\w+\s*)?=\s*(50|7\.5)\b|"
                              r"default=(50|7\.5)\b")


def sampling_defaults(files):
    """No 50-step / 7.5-guidance literals as defaults outside the adapters' pipeline_defaults (the
    zoo records its own fixed protocol)."""
    return [f"{p}:{i}: {line.strip()}" for p, i, line in
            _lines(files, lambda p: p.startswith(ADAPTERS) or p in BUILDERS or p.startswith("zoo/"))
            if SAMPLING_DEFAULT.search(line)]


def test_sampling_defaults_live_in_one_place():
    _check(sampling_defaults, {"scanning.py": "def f(num_inference_steps=50):\n"})


BUILTIN_RAISE = re.compile(r"raise (ValueError|TypeError|RuntimeError|KeyError|NotImplementedError|FileNotFoundError|"
                           r"OSError|IndexError)\(")


def builtin_raises(files):
    """Outside the kernels' own argument checks (sharpfast.ops), every raise is a SharpfastError
    (each also the built-in type a caller would catch)."""
    return [f"{p}:{i}" for p, i, line in _lines(files, lambda p: p.startswith("ops/")) if BUILTIN_RAISE.search(line)]


def test_library_code_raises_sharpfast_errors():
    _check(builtin_raises, {"detection.py": "raise ValueError('x')\n"})


def _imports(path: str, text: str):
    """(module the import resolves to inside sharpfast, the names imported) of each import."""
    pkg = ["sharpfast", *pathlib.PurePath(path).parent.parts]
    if pathlib.PurePath(path).name == "__init__.py":
        pass
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def cli_imports(files):
    """The library never imports sharpfast.cli (the CLI imports the library, not back; __main__
    is the CLI's entry point)."""
    return [f"{p}:{line}: {mod}" for p, text in files.items()
            if not p.startswith("cli/") and p != "__main__.py"
            for mod, names, line in _imports(p, text)
            if mod == "sharpfast.cli" or mod.startswith("sharpfast.cli.") or (mod == "sharpfast" and "cli" in names)]


def test_the_library_never_imports_the_cli():
    _check(cli_imports, {"server/app.py": "from ..cli.common import load_model\n"})


def private_imports(files):
    """No private name (a leading underscore) imported from another module of the package,
    except inside ops/ (the kernels' private layers) and of its own submodules."""
    hits = []
    for p, text in files.items():
        if p.startswith("ops/"):
            continue
        for mod, names, line in _imports(p, text):
            if not mod.startswith("sharpfast"):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__") and not mod.startswith("sharpfast.ops"):
                    hits.append(f"{p}:{line}: from {mod} import {n}")
    return hits


def test_no_private_name_is_imported_from_another_module():
    _check(private_imports, {"server/ray_serve.py": "from .service import _guard\n"})


# ---- HTTP --------------------------------------------------------------------------------------

ROUTE = re.compile(r"""\.(get|post|put|delete|patch|api_route)\(\s*["'](/[\w/-]*)["']""")


def duplicate_routes(files):
    """Each HTTP route is defined once (one router; the transports serve its app)."""
    seen: dict = {}
    for p, i, line in _lines(files):
        for m in ROUTE.finditer(line):
            seen.setdefault((m.group(1), m.group(2)), []).append(f"{p}:{i}")
    return [f"{k}: {v}" for k, v in seen.items() if len(v) > 1]


def test_each_http_route_is_defined_once():
    found = {m.group(2) for _, _, line in _lines(TREE) for m in ROUTE.finditer(line)}
    assert {"/generate", "/health", "/metrics"} <= found, found
    _check(duplicate_routes, {"server/a.py": '@api.post("/generate")\n', "server/b.py": '@router.post("/generate")\n'})


# ---- sizes and names ---------------------------------------------------------------------------

def long_modules(files, limit=450):
    return [f"{p}: {text.count(chr(10))} lines" for p, text in files.items() if text.count("\n") > limit]


def test_no_module_over_450_lines():
    _check(long_modules, {"big.py": "x = 1\n" * 451})


def _long_functions(tree, limit):
    return [(n.name, n.lineno, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def long_functions(files):
    """Every function, signature and docstring included, fits on one screen."""
    return [(p, *f) for p, text in files.items() for f in _long_functions(ast.parse(text), 60)]


def test_no_function_over_60_lines():
    _check(long_functions, {"f.py": "def f():\n" + "    x = 1\n" * 60})


_SUFFIXES = ("ations", "ation", "ions", "ion", "ing", "ers", "er", "ors", "or", "s")


def _stem(name: str) -> str:
    for suf in _SUFFIXES:
        if name.endswith(suf) and len(name) - len(suf) >= 3:
            return name[: -len(suf)]
    return name


def _one_letter_apart(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    s, t = (a, b) if len(a) < len(b) else (b, a)
    return any(t[:i] + t[i + 1:] == s for i in range(len(t)))


def look_alike_modules(files):
    """No two sibling modules (or packages: one folder's entries) whose names differ by a letter or
    a suffix: mitigation / mitigations, server / server_api, serving / server, detection / detectors."""
    folders: dict = {}
    for p in files:
        pp = pathlib.PurePath(p)
        for depth in range(len(pp.parts) - 1):  # every package on the path is an entry of its parent
            folders.setdefault(pp.parts[:depth], set()).add(pp.parts[depth])
        if pp.stem != "__init__" and not pp.stem.startswith("_"):
            folders.setdefault(pp.parts[:-1], set()).add(pp.stem)
    hits = []
    for folder, entries in folders.items():
        names = sorted(entries)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if _one_letter_apart(a, b) or _stem(a) == _stem(b) or b.startswith(a + "_") or a.startswith(b + "_"):
                    hits.append(("/".join(folder), a, b))
    return hits


def test_no_look_alike_module_names():
    _check(look_alike_modules, {"mitigation.py": "", "mitigations/__init__.py": ""})
    for pair in (("server.py", "server_api.py"), ("serving.py", "server/x.py"), ("detection.py", "detectors.py"),
                 ("score.py", "scores.py")):
        assert look_alike_modules(dict.fromkeys(pair, "")), pair


# ---- types -------------------------------------------------------------------------------------

def _fully_annotated(fn) -> bool:
    a = fn.args
    params = a.posonlyargs + a.args + a.kwonlyargs + ([a.vararg] if a.vararg else []) + ([a.kwarg] if a.kwarg else [])
    params = [x for i, x in enumerate(params) if not (i == 0 and x.arg in ("self", "cls"))]
    return fn.returns is not None and all(x.annotation is not None for x in params)


def annotation_share(files) -> float:
    fns = [n for text in files.values() for n in ast.walk(ast.parse(text))
           if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return sum(map(_fully_annotated, fns)) / max(len(fns), 1)


def too_few_annotations(files):
    share = annotation_share(files)
    return [f"{share:.1%} of the functions are fully annotated (parameters and return); at least 80%"] \
        if share < 0.8 else []


def test_at_least_80_percent_of_functions_are_fully_annotated():
    _check(too_few_annotations, {"f.py": "def f(x): pass\n" * 5 + "def g(x: int) -> None: pass\n"})


def test_mypy_checks_untyped_bodies():
    """The type checker also checks the bodies of functions without annotations (CI runs it)."""
    conf = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["mypy"]
    assert conf.get("check_untyped_defs") is True and conf.get("files") == ["sharpfast"]
