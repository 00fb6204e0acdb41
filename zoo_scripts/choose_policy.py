"""Choose a bundled model's guard policy on its tuning half and store it in calibration.json.

    sharpfast eval guard --model M --half A --seeds 4 --policy 0.01 --policy 0.01:s1t0 ... --out DIR
    python -m zoo_scripts.choose_policy --model M --frontier DIR/guard_frontier.json [DIR2/guard_frontier.json ...]

The rule (settings.POLICY_BUDGET): among the policies whose guarded / plain fidelity is at least
the budget on the half's normal prompts and on its memorized prompts, the one with the fewest
copies at 0.8 on the memorized prompts; a tie goes to the smaller gate (less normal traffic
mitigated). A policy run with another mitigation than the guard's auto one (`--mitigation
drop_trigger`) is stored with it ("mitigation"; `mitigation="auto"` takes it). With no policy
inside the budget, the default gate is kept (no policy stored). The
policy, the numbers it was chosen on and the rule are written under "policy" in the model's
calibration.json (policy="auto" reads it); the held-out half B is not read here.
"""
from __future__ import annotations

import argparse
import json
import os

from sharpfast import settings, zoo
from sharpfast.guarding import AUTO_MITIGATION, Policy


def choose(points: list, budget: dict) -> dict | None:
    """The chosen point of a policy frontier (guard_frontier.json's entries), or None."""
    ok = [p for p in points if "normal" in p["summary"]
          and p["summary"]["normal"]["fidelity_ratio"] >= budget["normal_fidelity"]
          and p["summary"]["fidelity_ratio"] >= budget["memorized_fidelity"]]
    if not ok:
        return None
    return min(ok, key=lambda p: (p["summary"]["guard"]["copies_at_0.8"], Policy.parse(p["policy"]).share,
                                  len(p["policy"])))


def _name(point: dict) -> str:
    """A frontier point's policy, with its mitigation when it is not the guard's auto one."""
    m = point.get("mitigation")
    return point["policy"] if m in (None, AUTO_MITIGATION[0][0]) else f"{point['policy']} ({m})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=zoo.MODELS)
    ap.add_argument("--frontier", required=True, nargs="+",
                    help="guard_frontier.json of `sharpfast eval guard --half A` (several: their policies together; "
                         "the same seeds and half)")
    a = ap.parse_args(argv)
    points: list = []
    for path in a.frontier:
        with open(path, encoding="utf-8") as f:
            points += [p for p in json.load(f) if _name(p) not in {_name(q) for q in points}]
    if len({(p["summary"]["images"], p["summary"].get("normal", {}).get("images")) for p in points}) > 1:
        raise SystemExit("the frontiers were judged on different images (another half or seed count): compare "
                         "policies on the same ones")
    best = choose(points, settings.POLICY_BUDGET)
    path = os.path.join(zoo.path(a.model), "calibration.json")
    with open(path, encoding="utf-8") as f:
        cal = json.load(f)
    cal.pop("policy", None)
    if best is not None:
        s = best["summary"]
        cal["policy"] = {"policy": best["policy"],
                         **({"mitigation": best["mitigation"]} if _name(best) != best["policy"] else {}),
                         "chosen_on": f"half A (memorized and normal prompts), {s['images']} memorized and "
                                      f"{s['normal']['images']} normal images",
                         "rule": "fewest copies@0.8 of memorized outputs with guarded/plain fidelity >= "
                                 f"{settings.POLICY_BUDGET['normal_fidelity']} (normal) and "
                                 f"{settings.POLICY_BUDGET['memorized_fidelity']} (memorized)",
                         "copies_at_0.8": s["guard"]["copies_at_0.8"], "memorized_fidelity_ratio": s["fidelity_ratio"],
                         "normal_fidelity_ratio": s["normal"]["fidelity_ratio"],
                         "normal_mitigated": s["normal"]["mitigated"],
                         "candidates": [_name(p) for p in points]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cal, f, indent=1)
    print(json.dumps(cal.get("policy"), indent=1))


if __name__ == "__main__":
    main()
