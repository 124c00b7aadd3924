"""attnhub._env.getter: always equal to os.environ.get, through every way os.environ changes."""

from __future__ import annotations

import os

from attnhub import _env

NAME = "ATTNHUB_TEST_ENV_GETTER"


def test_getter_follows_os_environ(monkeypatch):
    get = _env.getter(NAME)
    monkeypatch.delenv(NAME, raising=False)
    assert get() is None
    monkeypatch.setenv(NAME, "triton_fa_rope")
    assert get() == os.environ.get(NAME) == "triton_fa_rope"
    os.environ[NAME] = "näme"  # non-ASCII survives the bytes round trip
    assert get() == "näme"
    del os.environ[NAME]
    assert get() is None
    os.environ.update({NAME: "x"})
    assert get() == "x"
    os.environ.pop(NAME)
    assert get() is None


def test_fallback_off_posix(monkeypatch):
    with monkeypatch.context() as patched:
        patched.setattr(os, "name", "nt")
        get = _env.getter(NAME)
    assert get.__name__ == "<lambda>"  # the plain os.environ.get path
    monkeypatch.setenv(NAME, "math")
    assert get() == "math"
