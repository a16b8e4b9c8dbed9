import os
import pickle

import pytest
import torch

from vitscope.files import atomic_path, atomic_write
from vitscope.rundir import RunDir


class WriterFailed(Exception):
    pass


def test_atomic_write_writes_bytes_and_text_as_utf8(tmp_path):
    atomic_write(tmp_path / "a", b"\x00\xff")
    atomic_write(tmp_path / "b", "größe\n")
    assert (tmp_path / "a").read_bytes() == b"\x00\xff"
    assert (tmp_path / "b").read_bytes() == "größe\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("failure", [WriterFailed, KeyboardInterrupt])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path, failure):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    with pytest.raises(failure):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half of the ne")
            raise failure()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_a_failing_writer_of_a_new_file_leaves_nothing(tmp_path):
    with pytest.raises(WriterFailed):
        with atomic_path(tmp_path / "new.json") as temporary:
            temporary.write_text("{")
            raise WriterFailed()
    assert list(tmp_path.iterdir()) == []


def test_writers_of_the_same_file_at_once_each_get_their_own_temporary_file(tmp_path):
    # As two processes filling one cache: each writes its own file, the last rename wins, nothing is left over.
    target = tmp_path / "train-images-idx3-ubyte"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        assert str(os.getpid()) in first.name
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the outer block ends last
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through Linux's /proc")
def test_durable_writes_flush_the_file_and_its_folder(tmp_path, monkeypatch):
    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda descriptor: flushed.append(os.readlink(f"/proc/self/fd/{descriptor}"))
                        or real_fsync(descriptor))
    atomic_write(tmp_path / "weights", b"w", durable=True)
    assert len(flushed) == 2 and flushed[0].endswith(".tmp") and flushed[1] == str(tmp_path)
    atomic_write(tmp_path / "config.json", "{}")
    assert len(flushed) == 2  # not durable: no flush


def test_checkpoint_that_fails_to_save_leaves_the_previous_one(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_checkpoint({"step": torch.tensor(1)})
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        run.save_checkpoint({"step": torch.tensor(2), "unsaveable": lambda: None})  # pickling a lambda fails
    assert run.load_checkpoint()["step"].item() == 1
    assert [p.name for p in run.checkpoint_file.parent.iterdir()] == ["state.pt"]
