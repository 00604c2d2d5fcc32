"""kernels/cbuild.py: build once per source/flags/CPU, fall back through flag lists, warn when nothing builds."""
import ctypes

import pytest

from kernels import cbuild

SOURCE = "long add3(long a) { return a + 3; }\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELIBERATE_KERNEL_CACHE", str(tmp_path))
    return tmp_path


def _add3(lib):
    lib.add3.argtypes, lib.add3.restype = [ctypes.c_long], ctypes.c_long
    return lib.add3(39)


def test_builds_once_and_reuses_the_cached_library(cache):
    assert _add3(cbuild.load("t", SOURCE, [cbuild.native_flags()])) == 42
    (so,) = cache.glob("t_*.so")
    assert not list(cache.glob("*.c")), "the temporary source is removed"
    stamp = so.stat().st_mtime_ns
    assert _add3(cbuild.load("t", SOURCE, [cbuild.native_flags()])) == 42
    assert so.stat().st_mtime_ns == stamp and len(list(cache.glob("t_*.so"))) == 1
    # another source or other flags are another library
    cbuild.load("t", SOURCE + "\n", [cbuild.native_flags()])
    cbuild.load("t", SOURCE, [cbuild.native_flags() + ["-DX=1"]])
    assert len(list(cache.glob("t_*.so"))) == 3


def test_falls_back_to_the_next_flag_list(cache):
    lib = cbuild.load("t", SOURCE, [cbuild.native_flags() + ["--no-such-flag"], cbuild.native_flags()])
    assert _add3(lib) == 42
    assert len(list(cache.iterdir())) == 1, "a failed build leaves nothing behind"


def test_no_compiler_warns_with_the_error_and_returns_none(cache, monkeypatch):
    monkeypatch.setenv("CC", str(cache / "no-such-cc"))
    with pytest.warns(UserWarning, match="no-such-cc.*using the torch path"):
        assert cbuild.load("t", SOURCE, [cbuild.native_flags()]) is None
    assert not list(cache.iterdir()), "a failed build leaves nothing behind"


def test_another_cpu_gets_its_own_library(cache, monkeypatch):
    """-march=native code is per CPU: a cache shared by nodes with other CPUs must not hand it over."""
    cbuild.load("t", SOURCE, [cbuild.native_flags()])
    monkeypatch.setattr(cbuild, "cpu_fingerprint", lambda: "flags\t\t: fpu sse2")
    assert _add3(cbuild.load("t", SOURCE, [cbuild.native_flags()])) == 42
    assert len(list(cache.glob("t_*.so"))) == 2
