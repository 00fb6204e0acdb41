"""The evaluation harness, the baselines and the demo on the bundled models, reduced sets."""
import json
import os

import numpy as np
import pytest
import torch

import sharpfast
from sharpfast import zoo
from sharpfast.cli import main


@pytest.fixture(scope="module")
def pipe():
    p = zoo.load("digits")
    p.set_progress_bar_config(disable=True)
    return p


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("model", zoo.MODELS)
def test_eval_detect_table_json_png_and_resume(tmp_path, capsys, model):
    ev = zoo.prompts(model)
    mem = [r["prompt"] for r in ev if r["memorized"]][:4]
    non = [r["prompt"] for r in ev if not r["memorized"]][:4]
    args = ["eval", "detect", "--model", model, "--memorized", _write(tmp_path / "m.txt", mem),
            "--non-memorized", _write(tmp_path / "n.txt", non), "--n", "1,2", "--steps", "1",
            "--metrics", "wen,sharpness", "--num-inference-steps", "10", "--out", str(tmp_path / "o"), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "AUC" in out and "sharpness" in out
    rep = json.loads((tmp_path / "o" / "detect.json").read_text())
    assert len(rep["table"]) == 2 * 2
    assert all(0 <= r["auc"] <= 1 for r in rep["table"])
    # the AUC, computed here from the written scores as P(memorized score > non-memorized score):
    # swapped labels (AUC -> 1 - AUC) or a wrong set would differ
    from sharpfast import engine

    recs = engine.read_log(str(tmp_path / "o" / "scores_n1_steps1.jsonl"))[0]
    by_prompt = {r["prompt"]: r for r in recs}
    for m in ("wen", "sharpness"):
        pos, neg = [by_prompt[p][m] for p in mem], [by_prompt[p][m] for p in non]
        auc = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
        row = next(r for r in rep["table"] if r["metric"] == m and r["n"] == 1 and r["steps"] == 1)
        assert row["auc"] == pytest.approx(auc) and auc != 0.5, (m, row["auc"], auc)
    assert (tmp_path / "o" / "roc.png").stat().st_size > 1000
    scores = (tmp_path / "o" / "scores_n1_steps1.jsonl").read_text().splitlines()
    assert len(recs) == 8 and len(scores) == 8 + 1  # 8 records of one batch, then its commit line
    # a rerun resumes: nothing is scored twice, the table is the same
    assert main(args) == 0
    assert (tmp_path / "o" / "scores_n1_steps1.jsonl").read_text().splitlines() == scores
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds_per_prompt"} for r in rows]  # noqa: E731
    assert untimed(json.loads((tmp_path / "o" / "detect.json").read_text())["table"]) == untimed(rep["table"])
    # every row says what it costs: UNet calls per batch (sharpness: one more than wen) and time
    calls = {(r["metric"], r["n"]): r["unet_calls"] for r in rep["table"]}
    assert calls[("wen", 1)] == 1 and calls[("sharpness", 1)] == 2
    assert all(r["seconds_per_prompt"] > 0 for r in rep["table"])
    # the same folder with other prompts: their records are scored, the old ones never returned
    other = [p for p in non[::-1]]
    args2 = [a if a != str(tmp_path / "n.txt") else _write(tmp_path / "n2.txt", other[:2] + ["a brand new prompt"])
             for a in args]
    assert main(args2) == 0
    rep2 = json.loads((tmp_path / "o" / "detect.json").read_text())
    assert rep2["config"]["non_memorized"] == 3
    from sharpfast import engine

    latest = engine.read(str(tmp_path / "o" / "scores_n1_steps1.jsonl"))
    prompts_now = mem + other[:2] + ["a brand new prompt"]
    assert [latest[i]["prompt"] for i in range(len(prompts_now))] == prompts_now


@pytest.mark.parametrize("model", zoo.MODELS)
def test_eval_mitigate_runs_every_baseline(tmp_path, capsys, model):
    # sail_reference (8 candidates x 10 steps) is left to test_sail_settings_reach_sail: too slow here;
    # on scenes (the same code, another judge) three methods
    methods = ["none", "random_tokens", "wen_embedding", "sail", "sail_alpha", "transition", "attention_rescale"]
    if model == "scenes":
        methods = ["none", "sail", "transition"]
    args = ["eval", "mitigate", "--model", model, "--method", ",".join(methods),
            "--seeds", "2", "--limit", "2", "--num-inference-steps", "6", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "mitigate.json").read_text())["summary"]
    assert [r["method"] for r in summary] == methods
    from sharpfast import engine

    recs = list(engine.read(str(tmp_path / "mitigate.jsonl"), key="key").values())
    for r in summary:
        assert r["prompts"] == 2 and 0 <= r["copy_rate"] <= 1 and 0 <= r["fidelity"] <= 1
        # copies at each cut, recomputed here from the records: nearest is the memorized image and
        # similarity >= cut; the copy_rate itself is at the one cut, 0.8 (zoo.copying.COPY_CUT)
        mine = [x for x in recs if x["method"] == r["method"]]
        for cut in (0.8, 0.85, 0.9):
            hits = [t and s >= cut for x in mine for t, s in zip(x["nearest_is_target"], x["similarity"])]
            assert r["copy_rate_at"][str(cut)] == pytest.approx(sum(hits) / len(hits))
        assert r["copy_rate_at"]["0.8"] == pytest.approx(r["copy_rate"])
        assert r["copy_rate_at"]["0.8"] >= r["copy_rate_at"]["0.85"] >= r["copy_rate_at"]["0.9"]
        near = [s >= 0.8 for x in mine for s in x["similarity"]]  # own image at >= 0.8, whichever is nearest
        assert r["near_rate_at"]["0.8"] == pytest.approx(sum(near) / len(near))
        calls = [x["unet_calls_per_image"] for x in mine]
        assert r["unet_calls_per_image"] == pytest.approx(sum(calls) / len(calls))
        assert r["unet_calls_per_image"] >= 6  # the sampler's own steps at least
    plain = next(r for r in summary if r["method"] == "none")
    assert plain["unet_calls_per_image"] == 6 and plain["time_ratio"] == 1.0
    assert "copies@0.85" in capsys.readouterr().out
    assert (tmp_path / "mitigate_grid.png").stat().st_size > 1000
    assert (tmp_path / "similarity_hist.png").stat().st_size > 1000
    lines = (tmp_path / "mitigate.jsonl").read_text().splitlines()
    assert len(recs) == len(methods) * 2 and len(lines) == len(recs) + len(methods)  # a commit line per batch
    assert main(args) == 0, "a rerun resumes"
    assert (tmp_path / "mitigate.jsonl").read_text().splitlines() == lines


def test_eval_mitigate_rerun_with_other_settings_is_not_stale(tmp_path):
    """The same folder with other seeds or steps generates anew: a record counts only under the
    settings that made it."""
    base = ["eval", "mitigate", "--model", "digits", "--method", "none", "--limit", "2", "--out", str(tmp_path),
            "--quiet"]
    from sharpfast import engine

    def records():
        return list(engine.read(str(tmp_path / "mitigate.jsonl"), key="key").values())

    assert main(base + ["--seeds", "1", "--num-inference-steps", "3"]) == 0
    first = records()
    assert main(base + ["--seeds", "2", "--num-inference-steps", "3"]) == 0
    second = [r for r in records() if r["key"] not in {x["key"] for x in first}]
    assert len(second) == 2 and all(len(r["similarity"]) == 2 for r in second)
    assert main(base + ["--seeds", "2", "--num-inference-steps", "4"]) == 0
    third = json.loads((tmp_path / "mitigate.json").read_text())
    assert third["num_inference_steps"] == 4 and len(records()) == 6


def test_sail_settings_reach_sail(monkeypatch):
    """The harness's setting strings reach sail_latents as the keywords they name."""
    from sharpfast.mitigations import REGISTRY, Context, sail
    from sharpfast.mitigations.noise import sail_setting

    seen = []

    def fake(pipe, prompts, **kw):
        seen.append(kw)
        return kw["latents"], {"unet_calls_optimization": 0, "adam_steps": 0}

    monkeypatch.setattr(sail, "sail_latents", fake)
    lat = torch.zeros(1, 4, 8, 8)
    ctx = Context(None, None, ["p"], 1, lat, 16, 16, 5, 7.5)
    for method, setting in (("sail", "k1s3lr0.5"), ("sail_alpha", "k1s3a3e-5"), ("sail_reference", "k8s10lr0.3")):
        REGISTRY[method].plan(ctx, setting)
    assert {k: seen[0][k] for k in ("candidates", "max_steps", "lr")} == {"candidates": 1, "max_steps": 3, "lr": 0.5}
    assert "project" not in seen[0] and "objective" not in seen[0]
    assert seen[1]["alpha"] == 3e-5 and seen[1]["project"] is False
    ref = seen[2]
    assert (ref["objective"], ref["candidates"], ref["max_steps"], ref["lr"], ref["max_rounds"]) == \
        ("reference", 8, 10, 0.3, 1)
    assert ref["threshold"] < -1e20, "the reference loop runs every step (no early exit)"
    assert sail_setting("k8s10")["candidates"] == 8 and "lr" not in sail_setting("k8s10")
    with pytest.raises(ValueError, match="SAIL setting"):
        sail_setting("k1")


def test_random_tokens_and_wen_embedding(pipe):
    from sharpfast.mitigations.random_tokens import random_tokens
    from sharpfast.mitigations.wen_embedding import wen_embedding

    g = torch.Generator().manual_seed(0)
    out = random_tokens(pipe, ["a handwritten two"], num_tokens=3, generator=g)
    assert out[0].startswith("a handwritten two ") and len(out[0].split()) == 3 + 3
    prompt = zoo.prompts("digits", "memorized")[0]["prompt"]
    lat = torch.randn(2, 4, 8, 8, generator=g)
    emb, null, info = wen_embedding(pipe, [prompt, prompt], lat, target_ratio=0.5, max_steps=20,
                                    num_inference_steps=50, return_info=True)
    assert emb.shape == null.shape
    assert (info["final_loss"] < info["target"] / 0.5).all(), "||eps_Δ|| went down"
    assert not any(p.grad is not None for p in pipe.unet.parameters())


def test_demo_writes_its_outputs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "AUC" in out and "sail" in out
    for f in ("roc.png", "before_after.png", "results.jsonl"):
        assert (tmp_path / f).stat().st_size > 0
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(recs) == len(zoo.prompts("digits")) and {"wen", "sharpness", "flagged"} <= set(recs[0])


def test_sail_cli_writes_a_grid(tmp_path, capsys):
    prompt = zoo.prompts("digits", "memorized")[0]["prompt"]
    out = tmp_path / "sail.png"
    assert main(["sail", "--model", "digits", "--prompt", prompt, "--n", "2", "--num-inference-steps", "5",
                 "--max-steps", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "UNet calls" in text and out.stat().st_size > 1000


def test_sail_cli_writes_colour_images_in_colour(tmp_path):
    """`sharpfast sail --out` on the RGB scenes model draws what the pipeline made (it averaged the
    channels into grey)."""
    from PIL import Image

    prompt = zoo.prompts("scenes", "memorized")[0]["prompt"]
    out = tmp_path / "sail.png"
    assert main(["sail", "--model", "scenes", "--prompt", prompt, "--n", "1", "--num-inference-steps", "4",
                 "--max-steps", "1", "--out", str(out), "--quiet"]) == 0
    px = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    spread = px.max(axis=2) - px.min(axis=2)  # 0 everywhere in a grey drawing (its text is black)
    assert (spread > 40).mean() > 0.01, "the scenes images were drawn grey"


def test_eval_detect_on_files_scores_as_detect_and_scan_do(tmp_path, capsys):
    """The same file read by `eval detect`, `sharpfast detect` and `sharpfast scan`: the same ids
    (line numbers, blank lines skipped) and so the same noise and scores (eval once numbered
    prompts by their position in the union of its sets)."""
    ev = zoo.prompts("digits")
    mem = [r["prompt"] for r in ev if r["memorized"]][:3]
    non = [r["prompt"] for r in ev if not r["memorized"]][:3]
    mfile = _write(tmp_path / "m.txt", [mem[0], "", mem[1], mem[2]])
    nfile = _write(tmp_path / "n.txt", ["", non[0], non[1], "", non[2]])
    common = ["--model", "digits", "--num-inference-steps", "10", "--quiet"]
    assert main(["eval", "detect", "--memorized", mfile, "--non-memorized", nfile, "--n", "1", "--steps", "1",
                 "--metrics", "wen", "--out", str(tmp_path / "ev"), *common]) == 0
    from sharpfast import engine

    evaluated = {r["prompt"]: r["wen"] for r in engine.read_log(str(tmp_path / "ev" / "scores_n1_steps1.jsonl"))[0]}
    for f in (mfile, nfile):
        out = tmp_path / (os.path.basename(f) + ".jsonl")
        assert main(["detect", "--prompts", f, "--metrics", "wen", "--out", str(out), *common]) == 0
        for rec in map(json.loads, out.read_text().splitlines()):
            assert rec["wen"] == pytest.approx(evaluated[rec["prompt"]], rel=1e-5), rec["prompt"]


def test_eval_guard_reports_both_sides_and_resumes(tmp_path, capsys):
    """`sharpfast eval guard`: plain and guarded outputs of the same prompts and seeds, judged alike;
    the summary recomputed here from the rows; a rerun adds nothing."""
    args = ["eval", "guard", "--model", "digits", "--limit", "2", "--seeds", "2", "--num-inference-steps", "6",
            "--mitigation", "transition", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    doc = json.loads((tmp_path / "guard.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "guard.jsonl").read_text().splitlines()]
    every = [r for r in lines if "_commit" not in r]  # the one result format: a commit log of batches
    rows = [r for r in every if r["memorized"]]
    normal = [r for r in every if not r["memorized"]]
    assert len(rows) == 4 and len(normal) == 8 and doc["used"]["mitigation"] == "transition"
    s = doc["summary"]
    for side in ("plain", "guard"):
        near = [r[side]["similarity"] >= 0.8 for r in rows]
        copies = [r[side]["similarity"] >= 0.8 and r[side]["nearest_is_target"] for r in rows]
        assert s[side]["near_at_0.8"] == pytest.approx(sum(near) / 4)
        assert s[side]["copies_at_0.8"] == pytest.approx(sum(copies) / 4)
        assert s["normal"][side]["fidelity"] == pytest.approx(sum(r[side]["fidelity"] for r in normal) / 8)
    assert s["flagged"] == pytest.approx(sum(r["flagged"] for r in rows) / 4)
    assert s["normal"]["mitigated"] == pytest.approx(sum(r["mitigated"] for r in normal) / 8)
    assert {r["prompt"] for r in normal} <= {r["prompt"] for r in sharpfast.zoo.prompts("digits", "non_memorized")}
    assert all(r["mitigated"] == r["flagged"] for r in rows), "transition is applied to every flagged prompt"
    out = capsys.readouterr().out
    assert s["time_ratio"] > 0 and "guarded / plain time" in out and "normal prompts: mitigated" in out
    assert main(args) == 0
    assert (tmp_path / "guard.jsonl").read_text().splitlines() == [json.dumps(r) for r in lines], "a rerun resumes"
    # the same folder, another setting: nothing stale is reused
    assert main([a if a != "transition" else "drop_trigger" for a in args]) == 0
    again = [json.loads(line) for line in (tmp_path / "guard.jsonl").read_text().splitlines()]
    assert len([r for r in again if "_commit" not in r]) == 2 * len(every)
    assert json.loads((tmp_path / "guard.json").read_text())["used"]["mitigation"] == "drop_trigger"


def test_eval_guard_policy_frontier(tmp_path):
    """Several --policy: one resumable run each and the frontier; 'always' mitigates every prompt."""
    args = ["eval", "guard", "--model", "digits", "--limit", "1", "--seeds", "1", "--num-inference-steps", "6",
            "--policy", "0.3", "--policy", "always", "--policy", "0.3:s1t0", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    points = json.loads((tmp_path / "guard_frontier.json").read_text())
    assert [p["policy"] for p in points] == ["0.3", "always", "0.3:s1t0"]
    always = points[1]["summary"]
    assert always["mitigated"] == 1.0 and always["normal"]["mitigated"] == 1.0
    assert (tmp_path / "guard_frontier.png").stat().st_size > 10_000
