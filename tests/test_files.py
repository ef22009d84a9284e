"""core.files: the one atomic writer leaves the old file or the new one, with the user's umask."""
from __future__ import annotations

import os
import stat

import pytest

from core.files import atomic_folder, atomic_output, atomic_write


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_gets_the_users_umask_not_mkstemps_private_mode(tmp_path, umask_022):
    assert mode(atomic_write(tmp_path / "a.txt", "x")) == 0o644
    os.umask(0o077)
    assert mode(atomic_write(tmp_path / "b.txt", b"y")) == 0o600


def test_a_replaced_file_keeps_its_mode(tmp_path, umask_022):
    path = atomic_write(tmp_path / "a.txt", "old")
    path.chmod(0o640)
    atomic_write(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "a.csv", "old")
    with pytest.raises(RuntimeError):
        with atomic_output(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.csv"]


def test_the_temporary_keeps_the_suffix_so_writers_that_pick_a_format_by_extension_work(tmp_path):
    with atomic_output(tmp_path / "img.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path


def test_a_folder_is_replaced_whole(tmp_path, umask_022):
    target = tmp_path / "weights"
    with atomic_folder(target) as staging:
        (staging / "a").write_text("1")
    assert mode(target) == 0o755
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as staging:
            (staging / "b").write_text("2")
            raise RuntimeError("killed")
    assert os.listdir(target) == ["a"] and os.listdir(tmp_path) == ["weights"]
    with atomic_folder(target) as staging:
        (staging / "b").write_text("2")
    assert os.listdir(target) == ["b"] and os.listdir(tmp_path) == ["weights"]

