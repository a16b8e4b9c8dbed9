import os
import sys

from vitscope import process


def test_freed_memory_is_kept_on_glibc_unless_the_user_tuned_malloc(monkeypatch):
    glibc = sys.platform == "linux" and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    assert process.keep_freed_memory() is glibc
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert process.keep_freed_memory() is False
