"""attnhub.settings: the environment getter follows os.environ; every variable is validated naming itself;
`override` replaces values within a block and restores them."""

from __future__ import annotations

import os

import pytest

from attnhub import settings

NAME = "ATTNHUB_TEST_ENV_GETTER"


def test_getter_follows_os_environ(monkeypatch):
    get = settings._getter(NAME)
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
        get = settings._getter(NAME)
    assert get.__name__ == "<lambda>"  # the plain os.environ.get path
    monkeypatch.setenv(NAME, "math")
    assert get() == "math"


@pytest.mark.parametrize("setting,var,value,expected", [
    ("backend", "ATTNHUB_BACKEND", None, None), ("backend", "ATTNHUB_BACKEND", "", None),
    ("backend", "ATTNHUB_BACKEND", "math", "math"),
    ("registry", "ATTNHUB_REGISTRY", None, None), ("registry", "ATTNHUB_REGISTRY", "/x.yaml", "/x.yaml"),
    ("tune", "ATTNHUB_TUNE", None, False), ("tune", "ATTNHUB_TUNE", "0", False), ("tune", "ATTNHUB_TUNE", "1", True),
    ("cache_dir", "ATTNHUB_CACHE_DIR", "/c", "/c"),
    ("cache_dir", "ATTNHUB_CACHE_DIR", None, os.path.join(os.path.expanduser("~"), ".cache", "attnhub")),
    ("triton_bwd", "ATTNHUB_TRITON_BWD", None, "auto"), ("triton_bwd", "ATTNHUB_TRITON_BWD", "", "auto"),
    ("triton_bwd", "ATTNHUB_TRITON_BWD", "fused", "fused"), ("triton_bwd", "ATTNHUB_TRITON_BWD", "split", "split"),
    ("compile_ahead", "ATTNHUB_TRITON_COMPILE_AHEAD", None, True),
    ("compile_ahead", "ATTNHUB_TRITON_COMPILE_AHEAD", "", True),
    ("compile_ahead", "ATTNHUB_TRITON_COMPILE_AHEAD", "1", True),
    ("compile_ahead", "ATTNHUB_TRITON_COMPILE_AHEAD", "0", False),
    ("background_compile", "ATTNHUB_TRITON_BACKGROUND_COMPILE", None, True),
    ("background_compile", "ATTNHUB_TRITON_BACKGROUND_COMPILE", "", True),
    ("background_compile", "ATTNHUB_TRITON_BACKGROUND_COMPILE", "0", False),
    ("triton_launcher", "ATTNHUB_TRITON_LAUNCHER", None, "driver"),
    ("triton_launcher", "ATTNHUB_TRITON_LAUNCHER", "", "driver"),
    ("triton_launcher", "ATTNHUB_TRITON_LAUNCHER", "triton", "triton"),
    ("triton_replay", "ATTNHUB_TRITON_REPLAY", None, True), ("triton_replay", "ATTNHUB_TRITON_REPLAY", "0", False),
])
def test_values(setting, var, value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setenv(var, value)
    assert getattr(settings, setting)() == expected


@pytest.mark.parametrize("setting,var,value,expected", [
    ("tune", "ATTNHUB_TUNE", "true", "expected 0 or 1"),
    ("triton_bwd", "ATTNHUB_TRITON_BWD", "Fused", "expected one of auto, fused, split"),
    ("triton_bwd", "ATTNHUB_TRITON_BWD", " split", "expected one of auto, fused, split"),
    ("compile_ahead", "ATTNHUB_TRITON_COMPILE_AHEAD", "yes", "expected 0 or 1"),
    ("compile_ahead", "ATTNHUB_TRITON_COMPILE_AHEAD", " 1", "expected 0 or 1"),
    ("background_compile", "ATTNHUB_TRITON_BACKGROUND_COMPILE", "on", "expected 0 or 1"),
    ("triton_launcher", "ATTNHUB_TRITON_LAUNCHER", "ctypes", "expected one of driver, triton"),
    ("triton_replay", "ATTNHUB_TRITON_REPLAY", "off", "expected 0 or 1"),
])
def test_invalid_value_names_the_variable(setting, var, value, expected, monkeypatch):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=f"{var}={value!r}: {expected}"):
        getattr(settings, setting)()


def test_override_replaces_the_environment_and_restores(monkeypatch):
    monkeypatch.setenv("ATTNHUB_TRITON_BWD", "split")
    with settings.override(triton_bwd="fused", compile_ahead=False):
        assert settings.triton_bwd() == "fused" and settings.compile_ahead() is False
        with settings.override(triton_bwd="auto"):
            assert settings.triton_bwd() == "auto" and settings.compile_ahead() is False
        assert settings.triton_bwd() == "fused"
    assert settings.triton_bwd() == "split" and settings.compile_ahead() is True


@pytest.mark.parametrize("values,error", [(dict(triton_bwd="both"), ValueError), (dict(tune="1"), ValueError),
                                          (dict(triton_launcher="c"), ValueError),
                                          (dict(triton_replay="1"), ValueError),
                                          (dict(nonesuch=1), TypeError)])
def test_override_rejects_unknown_names_and_values(values, error):
    with pytest.raises(error, match="settings.override"):
        with settings.override(**values):
            pass
