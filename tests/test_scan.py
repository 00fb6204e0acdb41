"""sharpfast scan: input formats, resume after a real kill -9, two processes under accelerate equal
one process, bad input (missing / empty file, another scan in --out, disk full)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import sharpfast
from sharpfast.errors import BadArgument, OutputMismatch
from sharpfast.testing import tiny_pipeline

WORDS = "cats dogs cars trees sky sea boats birds fish moon sun rain snow wind fire ice".split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count everywhere: bitwise-equal scores


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sd1")
    tiny_pipeline("sd1").save_pretrained(d, safe_serialization=True)
    return str(d)


@pytest.fixture(scope="module")
def pipe(model_dir):
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def prompts_file(path, count):
    path.write_text("".join(f"prompt {i} about {WORDS[i % 16]}\n" for i in range(count)))
    return str(path)


def results(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(x) for x in f]


def cli(model_dir, prompts, out, *extra, launcher=()):
    cmd = [*launcher, "-m", "sharpfast", "scan", "--model", model_dir, "--prompts", prompts, "--out", out,
           "--batch-size", "3", "--num-inference-steps", "10", "--threshold", "0.03", "--quiet", *extra]
    return [sys.executable, *cmd] if not launcher else cmd


def test_formats_carry_fields_and_skip_bad_rows(pipe, tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\nthe sea\n   \nred car")  # no final newline
    s = sharpfast.scan(pipe, str(txt), str(tmp_path / "t"), batch_size=2, num_inference_steps=10, progress=False)
    assert (s["rows"], s["scored"], s["skipped"]) == (5, 3, 2)
    assert [r["prompt"] for r in results(tmp_path / "t") if "prompt" in r] == ["a cat", "the sea", "red car"]
    js = tmp_path / "p.jsonl"
    js.write_text('{"prompt": "a cat", "url": "u1", "key": "k1"}\n{"caption": "x", "key": "k2"}\nnot json\n'
                  '{"prompt": 3, "key": "k4"}\n{"prompt": "the sea", "key": "k5", "width": 512}\n')
    s = sharpfast.scan(pipe, str(js), str(tmp_path / "j"), id_field="key", column="prompt", batch_size=2,
                       num_inference_steps=10, progress=False)
    rows = results(tmp_path / "j")
    assert [r["id"] for r in rows] == ["k1", "k2", 2, "k4", "k5"]
    good = [r for r in rows if "prompt" in r]
    assert [(r["prompt"], r.get("url"), r.get("width")) for r in good] == [
        ("a cat", "u1", None),
        ("the sea", None, 512),
    ]
    assert s["skipped_by_reason"] == {"no 'prompt' string": 2, "not a JSON object": 1}
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a cat", None, "the sea"], "uid": [10, 11, 12]}), tmp_path / "p.parquet")
    s = sharpfast.scan(pipe, str(tmp_path / "p.parquet"), str(tmp_path / "q"), column="text", id_field="uid",
                       metrics=("wen",), batch_size=2, num_inference_steps=10, progress=False)
    assert [(r["id"], r.get("prompt")) for r in results(tmp_path / "q")] == [(10, "a cat"), (11, None), (12, "the sea")]
    with pytest.raises(ValueError, match="no column 'prompt'"):
        sharpfast.scan(pipe, str(tmp_path / "p.parquet"), str(tmp_path / "q2"), progress=False)


def test_resume_after_kill_9_holds_every_prompt_once(model_dir, tmp_path):
    src = prompts_file(tmp_path / "p.txt", 60)
    ref = str(tmp_path / "ref")
    subprocess.run(cli(model_dir, src, ref), env=ENV, check=True, capture_output=True)
    out = str(tmp_path / "out")
    proc = subprocess.Popen(cli(model_dir, src, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = os.path.join(out, "shards", "rank-00000.jsonl")
    deadline = time.time() + 600  # bounded; on a loaded 2-core machine the start alone took over 100 s
    while time.time() < deadline and proc.poll() is None:  # kill once a few chunks are committed, mid-run
        if os.path.exists(shard) and open(shard).read().count('"_commit"') >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = open(shard).read().count('"_commit"')
    assert 3 <= committed < 20, "killed mid-run"
    assert not os.path.exists(os.path.join(out, "results.jsonl"))
    subprocess.run(cli(model_dir, src, out), env=ENV, check=True, capture_output=True)
    got = results(out)
    assert [r["row"] for r in got] == list(range(60)), "every prompt exactly once"
    assert got == results(ref)


def test_two_processes_under_accelerate_equal_one(model_dir, tmp_path):
    pytest.importorskip("accelerate")
    src = prompts_file(tmp_path / "p.txt", 20)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run(cli(model_dir, src, one), env=ENV, check=True, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(29500 + os.getpid() % 1000), "--num_cpu_threads_per_process", "1"]
    r = subprocess.run(cli(model_dir, src, two, launcher=launch), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(os.path.join(two, "shards"))) == ["rank-00000.jsonl", "rank-00001.jsonl"]
    assert all(os.path.getsize(os.path.join(two, "shards", f)) > 0 for f in os.listdir(os.path.join(two, "shards")))
    assert results(one) == results(two)


def test_rerun_on_an_edited_file_is_refused_never_stale(pipe, tmp_path):
    """The same path with other contents is another scan: once, the rerun returned prompts that
    were no longer in the file (the check compared the path only)."""
    src = prompts_file(tmp_path / "p.txt", 6)
    out = str(tmp_path / "o")
    sharpfast.scan(pipe, src, out, metrics=("wen",), batch_size=3, num_inference_steps=10, progress=False)
    with open(src, "w", encoding="utf-8") as f:
        f.writelines(f"an entirely new prompt {i}\n" for i in range(4))
    with pytest.raises(OutputMismatch, match="prompts_sha256"):
        sharpfast.scan(pipe, src, out, metrics=("wen",), batch_size=3, num_inference_steps=10, progress=False)
    s = sharpfast.scan(pipe, src, out, metrics=("wen",), batch_size=3, num_inference_steps=10, overwrite=True,
                       progress=False)
    assert s["scored"] == 4
    assert [r["prompt"] for r in results(out)] == [f"an entirely new prompt {i}" for i in range(4)]


def test_bad_input(pipe, model_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        sharpfast.scan(pipe, str(tmp_path / "missing.txt"), str(tmp_path / "o"), progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        sharpfast.scan(pipe, str(tmp_path / "empty.txt"), str(tmp_path / "o"), progress=False)
    r = subprocess.run(cli(model_dir, str(tmp_path / "missing.txt"), str(tmp_path / "o")), env=ENV,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr
    src = prompts_file(tmp_path / "p.txt", 9)
    out = str(tmp_path / "o")
    sharpfast.scan(pipe, src, out, metrics=("wen",), batch_size=3, num_inference_steps=10, progress=False)
    with pytest.raises(OutputMismatch, match="other inputs or settings.*metrics"):
        sharpfast.scan(pipe, src, out, metrics=("wen", "sharpness"), batch_size=3, num_inference_steps=10,
                       progress=False)
    with pytest.raises(BadArgument, match="threshold must be a finite number"):
        sharpfast.scan(pipe, src, str(tmp_path / "o2"), threshold=float("nan"), progress=False)
    with pytest.raises(BadArgument, match="batch_size must be an int >= 1"):
        sharpfast.scan(pipe, src, str(tmp_path / "o2"), batch_size=0, progress=False)
    for bad in (["--threshold", "nan"], ["--batch-size", "0"]):  # refused before the model loads
        r = subprocess.run(cli(str(tmp_path / "no-model"), src, str(tmp_path / "o3"), *bad), env=ENV,
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("sharpfast: ") and "Traceback" not in r.stderr, r.stderr
    s = sharpfast.scan(pipe, src, out, metrics=("wen", "sharpness"), batch_size=3, num_inference_steps=10,
                       overwrite=True, progress=False)
    assert s["scored"] == 9 and "sharpness" in results(out)[0]
    # disk full on the second chunk: the first survives, the error says what to do, a rerun completes
    from sharpfast import scanning

    real_fsync = os.fsync
    calls = {"n": 0}

    def flaky_fsync(fd):  # the device fills up while the second chunk is being written
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    out2 = str(tmp_path / "full")
    monkeypatch.setattr(scanning.os, "fsync", flaky_fsync)
    with pytest.raises(OSError, match="No space left.*rerun to resume"):
        sharpfast.scan(pipe, src, out2, metrics=("wen",), batch_size=3, num_inference_steps=10, progress=False)
    monkeypatch.setattr(scanning.os, "fsync", real_fsync)
    shard = open(os.path.join(out2, "shards", "rank-00000.jsonl")).read()
    assert shard.count('"_commit"') == 1 and shard.endswith('{"_commit": 0}\n'), "cut back to the last good chunk"
    s = sharpfast.scan(pipe, src, out2, metrics=("wen",), batch_size=3, num_inference_steps=10, progress=False)
    assert [r["row"] for r in results(out2)] == list(range(9)) and s["scored"] == 9


def test_row_i_is_detect_of_that_prompt_with_seed_plus_i(pipe, tmp_path):
    """Prompt on row i draws its noise from seed + i (blank rows keep their number): each scored
    row equals sharpfast.detect of that prompt alone, with the pipeline's own draw from seed + i."""
    src = tmp_path / "p.txt"
    lines = ["a cat on a mat", "", "two dogs", "an old map", "a red house"]
    src.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "o")
    sharpfast.scan(pipe, str(src), out, metrics=("wen", "sharpness"), batch_size=2, seed=9, num_inference_steps=10,
                   progress=False)
    rows = {r["row"]: r for r in results(out)}
    assert rows[1].get("skipped") and [i for i, r in rows.items() if "prompt" in r] == [0, 2, 3, 4]
    for i in (0, 2, 3, 4):
        lat = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(9 + i))
        ref = sharpfast.detect(pipe, [lines[i]], metrics=("wen", "sharpness"), latents=lat, num_inference_steps=10,
                               progress=False)
        assert rows[i]["wen"] == pytest.approx(float(ref.scores["wen"][0]), rel=1e-5)
        assert rows[i]["sharpness"] == pytest.approx(float(ref.scores["sharpness"][0]), rel=2e-3)


def test_full_disk_mid_write_and_during_the_merge(pipe, tmp_path, monkeypatch):
    """A write that stops half-way with ENOSPC: the shard is cut back to its last commit and the
    error says so (the recovery itself once failed again in close()); a full disk during the merge
    leaves no partial results.jsonl.tmp, and a rerun completes."""
    from sharpfast import scanning

    src = prompts_file(tmp_path / "p.txt", 9)
    out = str(tmp_path / "o")
    real = os.pwrite
    calls = {"n": 0}

    def half_then_full(fd, data, pos):
        calls["n"] += 1
        if calls["n"] == 2:  # the second chunk: half of it reaches the disk, then the disk is full
            real(fd, bytes(data[: len(data) // 2]), pos)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    monkeypatch.setattr(scanning.os, "pwrite", half_then_full)
    with pytest.raises(OSError, match="No space left.*last complete batch.*rerun to resume"):
        sharpfast.scan(pipe, src, out, metrics=("wen",), batch_size=3, num_inference_steps=10, progress=False)
    monkeypatch.setattr(scanning.os, "pwrite", real)
    shard = open(os.path.join(out, "shards", "rank-00000.jsonl")).read()
    assert shard.endswith('{"_commit": 0}\n') and shard.count('"_commit"') == 1

    real_replace = os.replace

    def full_on_results(a, b):
        if b.endswith("results.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(scanning.os, "replace", full_on_results)
    with pytest.raises(OSError, match="results.jsonl failed.*kept in the shards"):
        sharpfast.scan(pipe, src, out, metrics=("wen",), batch_size=3, num_inference_steps=10, progress=False)
    assert not os.path.exists(os.path.join(out, "results.jsonl.tmp"))
    monkeypatch.setattr(scanning.os, "replace", real_replace)
    s = sharpfast.scan(pipe, src, out, metrics=("wen",), batch_size=3, num_inference_steps=10, progress=False)
    assert s["scored"] == 9 and [r["row"] for r in results(out)] == list(range(9))


def test_scan_flags_on_the_guards_detector_by_default(tmp_path):
    """Issue 33, item 1: scan's defaults flag on the detector the guard decides on (one place:
    settings.GUARD_METRIC), so a corpus audit finds what the guard would: on the bundled digits
    model, the guard's 1% threshold and the calibrated cut agree, prompt by prompt."""
    from sharpfast import settings

    pipe = sharpfast.zoo.load("digits")
    pipe.set_progress_bar_config(disable=True)
    mem = [r["prompt"] for r in sharpfast.zoo.prompts("digits", "memorized")[:6]]
    src = tmp_path / "p.txt"
    src.write_text("\n".join(mem) + "\n")
    summary = sharpfast.scan(pipe, str(src), str(tmp_path / "out"), progress=False)
    assert settings.GUARD_METRIC in settings.DEFAULT_METRICS
    assert summary["flag_metric"] == settings.GUARD_METRIC
    with sharpfast.guard(pipe) as g:
        assert summary["threshold"] == pytest.approx(g.threshold)
