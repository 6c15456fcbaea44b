"""Where numba may cache: the daemons must start even from a read-only install."""

import os

from host_daemon import jit


def test_an_explicit_cache_dir_is_used_as_is(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert jit._cache_dir_ready() is True
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path)


def test_a_writable_source_tree_needs_no_setting(monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(jit.os, "access", lambda path, mode: True)
    assert jit._cache_dir_ready() is True
    assert "NUMBA_CACHE_DIR" not in os.environ


def test_a_read_only_install_caches_in_a_private_temporary_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(jit.tempfile, "gettempdir", lambda: str(tmp_path))
    real_access = os.access
    source_tree = str(jit.Path(jit.__file__).resolve().parent.parent)
    monkeypatch.setattr(jit.os, "access",
                        lambda path, mode: False if str(path) == source_tree else real_access(path, mode))
    assert jit._cache_dir_ready() is True
    cache = jit.Path(os.environ["NUMBA_CACHE_DIR"])
    assert cache.parent == tmp_path and cache.is_dir()
    assert (cache.stat().st_mode & 0o777) == 0o700


def test_nowhere_writable_means_no_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(jit.tempfile, "gettempdir", lambda: str(tmp_path / "missing" / "deeper"))
    monkeypatch.setattr(jit.os, "access", lambda path, mode: False)
    assert jit._cache_dir_ready() is False
    assert "NUMBA_CACHE_DIR" not in os.environ
