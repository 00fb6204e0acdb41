"""Every inference-time mitigation in one registry: `sharpfast.mitigate(pipe, prompt, method=...)`.

A method is one module of this package that registers itself (`register`: its declared cost,
its main knob with a default and a sweep, what it needs of a model family, its kind, and for a
noise method how the serving guard runs it) with one function `plan(ctx, setting) -> Plan`:
what the pipeline call must get (other initial latents, prompts or embeddings) and the hooks it
runs under (sharpfast.mitigations.hooks: a guidance rule on the denoiser's output; edited
cross-attention). `mitigate` and the serving guard both run a plan around the user's own
`pipe(...)` call; the pipeline is left as it was (hooks and processors removed, also on error).
A setting string ("s0t500", "k1s3lr0.7", "r2a0.3t0.1") is read by the one grammar of grammar.py.

The methods (each written from its paper; where public code exists its definition was read and
is noted in its module): none; the SAIL family (sail.py: the algorithm; noise.py: sail,
sail_alpha, sail_reference, sail_guard, sail+transition); random_tokens (Somepalli et al.);
wen_embedding (Wen et al.); transition (Jain et al.); attention_rescale (Ren et al.);
zhao_guard (GUARD, as its authors' code runs it); drop_trigger (ours: the word a memorized
prompt hinges on, dropped). Adding a method: a module here that calls `register`
(every module of the package is imported) and its name in sharpfast.catalog.MITIGATIONS (the
order the CLI lists them in; a test holds the two equal).
"""
from __future__ import annotations

import importlib
import pkgutil

from .. import catalog
from .base import GUARD_METRIC, NEEDS_WHY, REGISTRY, Context, Mitigation, Plan, check_family, get, register
from .run import mitigate, run_plan

# every module of this package but the framework's own is a method module: importing it registers it
_FRAMEWORK = {"base", "grammar", "hooks", "run", "sail"}
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _FRAMEWORK:
        importlib.import_module(f"{__name__}.{_mod}")

# the catalog's order (sharpfast --help lists them so); a method not in it comes last
for _name in sorted(REGISTRY, key=lambda n: catalog.MITIGATIONS.index(n) if n in catalog.MITIGATIONS else 99):
    REGISTRY[_name] = REGISTRY.pop(_name)
METHODS = tuple(REGISTRY)

__all__ = ["GUARD_METRIC", "NEEDS_WHY", "REGISTRY", "METHODS", "Context", "Mitigation", "Plan", "check_family", "get",
           "register", "mitigate", "run_plan"]
