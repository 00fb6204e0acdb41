"""The `sharpfast` command line: detect on a local model directory, resume, labels, help."""
import json
import subprocess
import sys

import pytest

from sharpfast.cli import main
from sharpfast.testing import tiny_pipeline

PROMPTS = ["a cat", "the No Limits Business Woman Podcast", "a dog", "an apple", "a tree"]
LABELS = [0, 1, 0, 1, 0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-sd1")
    tiny_pipeline("sd1").save_pretrained(d, safe_serialization=True)
    assert list(d.rglob("*.safetensors"))
    return d


def write(path, lines):
    path.write_text("\n".join(map(str, lines)) + "\n", encoding="utf-8")
    return str(path)


def args(model_dir, tmp_path, out, *extra):
    return ["detect", "--model", str(model_dir), "--prompts", write(tmp_path / "p.txt", PROMPTS),
            "--device", "cpu", "--dtype", "fp32", "--out", str(out), "--batch-size", "2", *extra]


def read(out):
    """The committed records of a commit log (see sharpfast.engine), in order."""
    from sharpfast import engine

    return engine.read_log(str(out))[0]


def rows_of(out):
    """The rows of a results file: plain JSON lines, one per prompt."""
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_detect_writes_one_line_per_prompt_and_resumes(model_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    log = tmp_path / "r.jsonl.log"
    assert main(args(model_dir, tmp_path, out, "--labels", write(tmp_path / "l.txt", LABELS))) == 0
    recs = rows_of(out)  # one row per prompt, nothing else: pandas reads 5 rows
    assert [r["id"] for r in recs] == list(range(5)) and all("_commit" not in r for r in recs)
    assert [r["prompt"] for r in recs] == PROMPTS and [r["label"] for r in recs] == LABELS
    printed = capsys.readouterr().out
    assert "AUC" in printed and f"wrote 5 rows (one per prompt) to {out}; 5 scored now" in printed
    full = {r["id"]: r for r in recs}
    # a run killed in its second batch (batches of 2: two records and a commit line each in the
    # log), one record of it on disk and the next torn: the rerun completes without duplicates
    lines = log.read_text().splitlines()
    assert json.loads(lines[2]) == {"_commit": 0}
    log.write_text("\n".join(lines[:4]) + "\n" + lines[4][:15], encoding="utf-8")
    assert [r["id"] for r in read(log)] == [0, 1], "only the committed batch counts"
    assert main(args(model_dir, tmp_path, out)) == 0
    again = read(log)[2:]
    ids = [0, 1] + [r["id"] for r in again]
    assert sorted(ids) == list(range(5)) and len(ids) == 5
    for r in again:  # same noise per prompt id: the same scores as the uninterrupted run
        assert r["wen"] == pytest.approx(full[r["id"]]["wen"], rel=1e-5)
    assert [r["id"] for r in rows_of(out)] == list(range(5)), "the results file is rewritten whole"
    assert "2 resumed" in capsys.readouterr().out


def test_detect_adopts_a_results_file_of_the_commit_log_format(model_dir, tmp_path):
    """An --out written by an earlier version (its own commit log) is resumed, not rescored."""
    out = tmp_path / "r.jsonl"
    assert main(args(model_dir, tmp_path, out)) == 0
    (tmp_path / "r.jsonl.log").replace(out)  # the earlier layout: the log was the results file
    assert main(args(model_dir, tmp_path, out)) == 0
    assert len(rows_of(out)) == 5 and len(read(tmp_path / "r.jsonl.log")) == 5


def fails(capsys, argv, message):
    """The CLI's contract for bad input: exit code 2, one `sharpfast: ...` line, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress bars may come first
    assert last.startswith("sharpfast: ") and message in last and "Traceback" not in err, err


def test_detect_errors(model_dir, tmp_path, capsys):
    fails(capsys, ["detect", "--model", str(model_dir), "--prompts", str(tmp_path / "missing.txt")],
          "prompts file not found")
    fails(capsys, ["detect", "--model", str(model_dir), "--prompts", write(tmp_path / "e.txt", [])],
          "prompts file is empty")
    fails(capsys, ["detect", "--model", str(tmp_path / "nope"), "--prompts", write(tmp_path / "p.txt", PROMPTS)],
          "local diffusers model directory")
    fails(capsys, args(model_dir, tmp_path, tmp_path / "x.jsonl", "--labels", write(tmp_path / "l2.txt", [0, 1])),
          "--labels must hold one 0/1 per line")
    (tmp_path / "bad.txt").write_bytes(b"a cat\n\xff\xfe broken\n")
    fails(capsys, ["detect", "--model", str(model_dir), "--prompts", str(tmp_path / "bad.txt")], "not UTF-8")
    # argument errors are reported before any model is loaded (the model path here does not exist)
    nope = ["detect", "--model", str(tmp_path / "nope"), "--prompts", write(tmp_path / "p.txt", PROMPTS)]
    fails(capsys, nope + ["--batch-size", "0"], "--batch-size must be an int >= 1")
    fails(capsys, nope + ["--n", "-1"], "--n must be an int >= 1")
    fails(capsys, nope + ["--guidance-scale", "nan"], "guidance_scale must be a finite number")
    fails(capsys, nope + ["--metrics", "wen,nope"], "unknown metric 'nope'")
    fails(capsys, nope + ["--out", str(tmp_path / "no" / "such" / "r.jsonl")], "the folder of --out does not exist")


def test_detect_rerun_with_other_input_is_refused_never_stale(model_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(args(model_dir, tmp_path, out)) == 0
    first = rows_of(out)
    # other settings on the same prompts are refused
    fails(capsys, args(model_dir, tmp_path, out, "--seed", "7"), "other prompts or settings")
    # the same path, edited: a resume would return the old prompts' records
    edited = ["a cat", "a different second prompt", "a dog"]
    base = ["detect", "--model", str(model_dir), "--device", "cpu", "--dtype", "fp32", "--out", str(out),
            "--prompts", write(tmp_path / "p.txt", edited)]
    fails(capsys, base, "holds 3 records of other prompts or settings")  # ids 1 (edited), 3 and 4 (gone)
    assert rows_of(out) == first  # nothing was lost
    assert main(base + ["--overwrite"]) == 0
    recs = rows_of(out)
    assert [r["prompt"] for r in recs] == edited and [r["id"] for r in recs] == [0, 1, 2]
    assert recs[0]["wen"] == pytest.approx(first[0]["wen"], rel=1e-6)  # same prompt, same line: same score


def test_detect_ids_are_line_numbers_and_noise_is_seed_plus_id(model_dir, tmp_path):
    """Blank lines are skipped and keep their number, as `sharpfast scan` reads the file, and the
    prompt on line i draws its noise from seed + i: each record equals sharpfast.detect of that
    prompt alone with that noise."""
    import torch
    from diffusers import StableDiffusionPipeline

    import sharpfast

    lines = ["a cat", "", "   ", "a dog", "an apple"]
    out = tmp_path / "r.jsonl"
    assert main(["detect", "--model", str(model_dir), "--prompts", write(tmp_path / "b.txt", lines), "--out",
                 str(out), "--batch-size", "2", "--seed", "5", "--quiet"]) == 0
    recs = rows_of(out)
    assert [(r["id"], r["prompt"]) for r in recs] == [(0, "a cat"), (3, "a dog"), (4, "an apple")]
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    for r in recs:
        g = torch.Generator().manual_seed(5 + r["id"])
        lat = torch.randn((1, 4, 8, 8), generator=g)  # the pipeline's own draw for one image
        ref = sharpfast.detect(pipe, [r["prompt"]], latents=lat, progress=False)
        assert r["wen"] == pytest.approx(float(ref.scores["wen"][0]), rel=1e-5)
        assert r["sharpness"] == pytest.approx(float(ref.scores["sharpness"][0]), rel=2e-3)  # fp32 fd, batch 2 vs 1


def test_help_explains_every_option():
    res = subprocess.run([sys.executable, "-m", "sharpfast", "detect", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for opt in ("--model", "--prompts", "--labels", "--metrics", "--n", "--steps", "--batch-size", "--device",
                "--dtype", "--out", "--hvp", "--seed"):
        assert opt in res.stdout


def test_sail_cli_checks_everything_before_loading_or_generating(tmp_path, capsys):
    """Each of these once failed after the model had loaded (or after generating): a diffusers
    reshape error for --n 0, NaN images with exit 0 for an infinite guidance scale, an unwritable
    --out found only at the end."""
    base = ["sail", "--model", str(tmp_path / "no-model"), "--prompt", "a cat"]
    fails(capsys, base + ["--n", "0"], "--n must be an int >= 1")
    fails(capsys, base + ["--guidance-scale", "inf"], "guidance_scale must be a finite number")
    fails(capsys, base + ["--guidance-scale", "1.0"], "guidance_scale must be > 1")
    fails(capsys, base + ["--max-steps", "-1"], "--max-steps must be an int >= 0")
    fails(capsys, base + ["--out", str(tmp_path / "missing" / "x.png")], "the folder of --out does not exist")
    fails(capsys, base + ["--out", str(tmp_path / "x.jpg")], "--out must be a .png file")
    fails(capsys, base, "local diffusers model directory")  # only now is the model looked for


def test_help_states_the_defaults_in_code():
    from sharpfast.mitigations.sail import DEFAULTS

    res = subprocess.run([sys.executable, "-m", "sharpfast", "sail", "--help"], capture_output=True, text=True)
    assert f"(default {DEFAULTS['paper']['candidates']})" in res.stdout
    assert f"(default {DEFAULTS['paper']['max_steps']})" in res.stdout


def test_detect_takes_the_bundled_model_and_auto_device(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["detect", "--model", "digits", "--prompts", write(tmp_path / "p.txt", ["a handwritten seven"]),
                 "--out", str(out), "--num-inference-steps", "10", "--quiet"]) == 0
    assert rows_of(out)[0]["prompt"] == "a handwritten seven"


def test_full_disk_and_read_only_output_are_one_line_errors(model_dir, tmp_path, capsys, monkeypatch):
    """A full disk while writing: one line, exit 2, and the rerun completes every prompt once; a
    read-only output folder is refused before any model loads."""
    import errno

    from sharpfast import engine

    out = tmp_path / "r.jsonl"
    real = engine.os.pwrite
    calls = {"n": 0}

    def full_on_second(fd, data, pos):  # the second batch's write: half of it lands, then the disk is full
        calls["n"] += 1
        if calls["n"] == 2:
            real(fd, bytes(data)[: len(data) // 2], pos)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    monkeypatch.setattr(engine.os, "pwrite", full_on_second)
    fails(capsys, args(model_dir, tmp_path, out), "No space left on device")
    monkeypatch.setattr(engine.os, "pwrite", real)
    assert len(read(tmp_path / "r.jsonl.log")) == 2  # the first batch is kept in the log
    assert main(args(model_dir, tmp_path, out)) == 0
    assert sorted(r["id"] for r in rows_of(out)) == list(range(5))
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    fails(capsys, ["detect", "--model", str(tmp_path / "no-model"), "--prompts", write(tmp_path / "q.txt", PROMPTS),
                   "--out", str(tmp_path / "x.jsonl")], "cannot write --out")
