"""Every command's options against the one table (sharpfast.cli.options): one name, one default
and one help per concept; the registries' names as the help lists them; --help without torch."""
import argparse
import os
import subprocess
import sys
import time

import pytest

from sharpfast.cli import parser
from sharpfast.cli.options import COMMAND_DEFAULTS, OPTIONS, OVERRIDABLE, spec

# the concepts every command shares, written out here independently of the table
SHARED = {
    "--model": dict(default=None, required=True),
    "--num-inference-steps": dict(default=None, required=False),
    "--guidance-scale": dict(default=None, required=False),
    "--batch-size": dict(default=8, required=False),
    "--seed": dict(default=42, required=False),
    "--device": dict(default="auto", required=False),
    "--dtype": dict(default="auto", required=False),
    "--threshold": dict(default="auto", required=False),
    "--fpr": dict(default=0.01, required=False),
    "--quiet": dict(default=False, required=False),
    "--metric": dict(default="wen_low", required=False),
    "--mitigation": dict(default="auto", required=False),
}


def commands():
    """(command name, its parser) for every command and eval subcommand."""
    out = []

    def walk(p, name):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append((name, p))
        for a in subs:
            for n, sp in a.choices.items():
                walk(sp, f"{name} {n}".strip())

    walk(parser(), "")
    return out


def options_of(p):
    return [a for a in p._actions if a.option_strings and a.dest != "help"]


def test_every_option_is_the_tables():
    seen = 0
    for name, p in commands():
        for a in options_of(p):
            flag = a.option_strings[0]
            assert flag in OPTIONS, f"{name} {flag} is not in sharpfast.cli.options.OPTIONS"
            want = spec(name, flag).kwargs()
            assert a.default == want.get("default", False if want.get("action") else None), (name, flag)
            assert a.help == want["help"], (name, flag)
            assert a.required == want.get("required", False), (name, flag)
            seen += 1
    assert seen > 80


def test_a_shared_concept_has_one_default_and_one_name():
    for name, p in commands():
        flags = {a.option_strings[0]: a for a in options_of(p)}
        assert "--steps" not in flags or name in ("detect", "eval detect"), \
            f"{name} --steps: --steps means the first sampling steps averaged (detect); use --num-inference-steps"
        for flag, want in SHARED.items():
            if flag in flags:
                a = flags[flag]
                assert (a.default, a.required) == (want["default"], want["required"]), (name, flag)
    # exceptions are written in the table, for the flags that may have them only
    assert {flag for _, flag in COMMAND_DEFAULTS} <= OVERRIDABLE
    assert not OVERRIDABLE & set(SHARED)


def test_help_lists_the_registries():
    from sharpfast import catalog
    from sharpfast.mitigations import REGISTRY as MITIGATIONS
    from sharpfast.scores import REGISTRY as METRICS

    assert catalog.METRICS == tuple(METRICS), "sharpfast.catalog.METRICS must list the metric registry"
    assert catalog.MITIGATIONS == tuple(MITIGATIONS), "sharpfast.catalog.MITIGATIONS must list the mitigations"
    detect = dict(commands())["detect"]
    text = detect.format_help()
    for m in METRICS:
        assert m in text, f"detect --help does not list the metric {m}"
    assert "%%" not in dict(commands())["eval detect"].format_help() and "%%" not in parser().format_help()


def test_every_command_has_a_description():
    for name, p in commands():
        assert p.description, f"sharpfast {name} has no description"


def test_help_answers_without_torch():
    """`sharpfast --help` and `sharpfast detect --help` import no torch (the CLI's lazy imports)."""
    code = ("import sys; from sharpfast.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'diffusers')))")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for argv in (["--help"], ["detect", "--help"], ["eval", "detect", "--help"], ["serve", "--help"]):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        assert "usage:" in res.stdout
        print(f"{' '.join(argv)}: {time.perf_counter() - t:.2f} s")  # shown with -s; not asserted (wall time)


def test_argument_errors_answer_without_torch():
    code = ("import sys; from sharpfast.cli import main\n"
            "try:\n    main(['detect', '--prompts', 'p.txt'])\nexcept SystemExit as e:\n    assert e.code == 2\n"
            "assert 'torch' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--model" in res.stderr


@pytest.mark.parametrize("old", ["--steps"])
def test_serve_takes_the_shared_name(old):
    serve = dict(commands())["serve"]
    assert old not in {a.option_strings[0] for a in options_of(serve)}
    assert "--num-inference-steps" in {a.option_strings[0] for a in options_of(serve)}


def test_help_says_what_each_option_is_where_it_is_used():
    """Issue 33, item 11: sail's --threshold is SAIL's target (not a flag), its --seed the generator's;
    --mitigation says what auto is; --seed speaks of rows, not lines only."""
    from sharpfast import settings

    helps = {(name, a.option_strings[0]): a.help for name, p in commands() for a in options_of(p)}
    assert "target" in helps[("sail", "--threshold")] and "flag" not in helps[("sail", "--threshold")]
    assert "generator" in helps[("sail", "--seed")]
    assert "row i" in helps[("scan", "--seed")]
    method, setting = settings.GUARD_MITIGATIONS[0]
    assert f"{method} {setting}" in helps[("serve", "--mitigation")]


def test_metric_takes_probed_names():
    """--metric wen_low@4 parses (wen_low with 4 probe noises); a name outside the catalog is an
    argparse error naming the valid forms."""
    checked = []
    for name, p in commands():
        if not any("--metric" in a.option_strings for a in p._actions):
            continue
        required = [a.option_strings[0] for a in p._actions if a.required]
        base = [x for flag in required for x in (flag, "digits")]
        assert p.parse_args(base + ["--metric", "wen_low@4"]).metric == "wen_low@4", name
        for bad in ("wen_low@1", "wen_low@17", "wen@4"):
            with pytest.raises(SystemExit):
                p.parse_args(base + ["--metric", bad])
        checked.append(name)
    assert "eval guard" in checked and "serve" in checked, checked
