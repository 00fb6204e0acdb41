"""The one resumable engine's commit log: only committed batches count, a torn tail is cut off on
reopening, batch ids never repeat, and a failed write leaves the log at its last commit."""
import errno
import json
import os

import pytest

from sharpfast import engine


def test_only_committed_batches_count_and_a_torn_tail_is_cut(tmp_path):
    path = str(tmp_path / "log.jsonl")
    with engine.CommitLog(path) as log:
        assert log.next_chunk() == 0
        log.commit(0, [{"id": 0}, {"id": 1}])
        log.commit(log.next_chunk(), [{"id": 2}])
    size = os.path.getsize(path)
    with open(path, "a") as f:  # a killed run: one record of its batch, then half a line
        f.write(json.dumps({"id": 3}) + "\n" + '{"id": 4, "pro')
    recs, chunks, good = engine.read_log(path)
    assert [r["id"] for r in recs] == [0, 1, 2] and chunks == {0, 1} and good == size
    assert set(engine.read(path)) == {0, 1, 2}
    with engine.CommitLog(path) as log:  # reopening cuts the uncommitted tail
        assert os.path.getsize(path) == size and log.next_chunk() == 2
        log.commit(2, [{"id": 3}])
    assert [r["id"] for r in engine.read_log(path)[0]] == [0, 1, 2, 3]


def test_a_failed_write_keeps_the_log_at_its_last_commit(tmp_path, monkeypatch):
    path = str(tmp_path / "log.jsonl")
    real = os.pwrite

    def half(fd, data, pos):
        real(fd, bytes(data)[: len(data) // 2], pos)
        raise OSError(errno.ENOSPC, "No space left on device")

    with engine.CommitLog(path) as log:
        log.commit(0, [{"id": 0}])
        size = os.path.getsize(path)
        monkeypatch.setattr(engine.os, "pwrite", half)
        with pytest.raises(OSError, match="last complete batch"):
            log.commit(1, [{"id": 1}])
    assert os.path.getsize(path) == size and [r["id"] for r in engine.read_log(path)[0]] == [0]


def test_fingerprint_is_order_free_and_value_sensitive():
    assert engine.fingerprint({"a": 1, "b": 2}) == engine.fingerprint({"b": 2, "a": 1})
    assert engine.fingerprint({"a": 1}) != engine.fingerprint({"a": 2})
