"""The design's rules, checked on the source: model families are adapter classes (no family
branches elsewhere), a family is added by one class, the guard stays small, one home for the
sampling defaults."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "sharpfast"
ADAPTERS = {"score.py"}          # the adapters: the one place that knows the families
BUILDERS = {"testing.py"}        # builds tiny pipelines of each family for the tests
FAMILY_BRANCH = re.compile(
    r"""\bfam(ily)?\s*(==|!=|\bin\b|\bnot in\b)\s*[("']|isinstance\(pipe,\s*\w*Pipeline|\.is_xl\b|"""
    r"""["'](StableDiffusion3?(XL)?|Flux)Pipeline["']|__name__\s*==\s*["']\w+Pipeline"""
)


def _sources():
    return [p for p in ROOT.rglob("*.py")]


def test_no_family_branches_outside_the_adapters():
    hits = []
    for p in _sources():
        if p.name in ADAPTERS | BUILDERS:
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if FAMILY_BRANCH.search(line.split("#")[0]):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "family branches outside sharpfast/adapters/:\n" + "\n".join(hits)


def test_the_branch_pattern_catches_what_it_should():
    # the pattern itself: a planted branch of each kind is found
    for line in ('if model.family == "flux":', "if fam in ('sd3', 'flux'):", "isinstance(pipe, FluxPipeline)",
                 "if model.is_xl:", 'names = ("StableDiffusionXLPipeline",)'):
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


def _function_lengths():
    out = []
    for p in _sources():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return out


def test_the_guard_is_small():
    tree = ast.parse((ROOT / "serving.py").read_text(encoding="utf-8"))
    (guard,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Guard"]
    assert guard.end_lineno - guard.lineno + 1 < 120


def _long_functions(tree, limit):
    return [(n.name, n.lineno, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def test_no_function_over_60_lines():
    """Every function in sharpfast/, signature and docstring included, fits on one screen."""
    long = [(str(p.relative_to(ROOT)), *f) for p in _sources() for f in _long_functions(ast.parse(p.read_text()), 60)]
    assert not long, long
    planted = ast.parse("def f():\n" + "    x = 1\n" * 60)  # 61 lines: the check sees it
    assert _long_functions(planted, 60) == [("f", 1, 61)]


def test_sampling_defaults_live_in_one_place():
    """No 50-step / 7.5-guidance literals as defaults outside sharpfast.adapters.pipeline_defaults
    (the training scripts and the zoo's measurement record their own fixed protocol)."""
    pat = re.compile(r"(num_inference_steps|guidance_scale)\s*(:\s*\w+\s*)?=\s*(50|7\.5)\b|default=(50|7\.5)\b")
    hits = []
    for p in _sources():
        if p.name in ADAPTERS | BUILDERS or p.parent.name == "zoo":
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if pat.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_library_code_raises_sharpfast_errors():
    """Outside the kernels' own argument checks (sharpfast.ops), every raise is a SharpfastError
    (each also the built-in type a caller would catch); a module __getattr__ keeps AttributeError,
    its protocol."""
    builtin = re.compile(r"raise (ValueError|TypeError|RuntimeError|KeyError|NotImplementedError|FileNotFoundError|"
                         r"OSError|IndexError)\(")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _sources() if p.parent.name != "ops"
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if builtin.search(line)]
    assert not hits, hits
