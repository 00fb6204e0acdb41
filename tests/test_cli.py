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
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_detect_writes_one_line_per_prompt_and_resumes(model_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(args(model_dir, tmp_path, out, "--labels", write(tmp_path / "l.txt", LABELS))) == 0
    recs = read(out)
    assert [r["id"] for r in recs] == list(range(5))
    assert [r["prompt"] for r in recs] == PROMPTS and [r["label"] for r in recs] == LABELS
    assert "AUC" in capsys.readouterr().out
    full = {r["id"]: r for r in recs}
    # a run killed after two prompts, its last line torn: the rerun completes without duplicates
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15], encoding="utf-8")
    assert main(args(model_dir, tmp_path, out)) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()[2:]]  # torn line was cut off
    ids = [0, 1] + [r["id"] for r in again]
    assert sorted(ids) == list(range(5)) and len(ids) == 5
    for r in again:  # same noise per prompt id: the same scores as the uninterrupted run
        assert r["wen"] == pytest.approx(full[r["id"]]["wen"], rel=1e-5)


def test_detect_errors(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="prompts file not found"):
        main(["detect", "--model", str(model_dir), "--prompts", str(tmp_path / "missing.txt"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="prompts file is empty"):
        main(["detect", "--model", str(model_dir), "--prompts", write(tmp_path / "e.txt", []), "--device", "cpu"])
    with pytest.raises(SystemExit, match="local diffusers model directory"):
        main(["detect", "--model", str(tmp_path / "nope"), "--prompts", write(tmp_path / "p.txt", PROMPTS)])
    with pytest.raises(SystemExit, match="2 labels for 5 prompts"):
        main(args(model_dir, tmp_path, tmp_path / "x.jsonl", "--labels", write(tmp_path / "l2.txt", [0, 1])))


def test_help_explains_every_option():
    res = subprocess.run([sys.executable, "-m", "sharpfast", "detect", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for opt in ("--model", "--prompts", "--labels", "--metrics", "--n", "--steps", "--batch-size", "--device",
                "--dtype", "--out", "--hvp", "--seed"):
        assert opt in res.stdout
