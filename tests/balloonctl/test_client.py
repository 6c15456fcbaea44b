"""Where balloonctl finds the admin token: --token-file, $BALLOON_CTL_TOKEN_FILE, or the file
the host generated for its port (shared/runtime/admin_token.py: the rule the host writes by)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balloonctl import client as ctl
from shared.runtime.admin_token import default_admin_token_dir


def test_balloonctl_looks_where_the_host_writes(tmp_path, monkeypatch):
    monkeypatch.delenv("BALLOON_CTL_TOKEN_FILE", raising=False)
    assert default_admin_token_dir(0, {}) == Path("/run/balloon")
    assert default_admin_token_dir(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == Path("/run/user/1000/balloon")
    assert default_admin_token_dir(1000, {}) == Path("/tmp/balloon-1000")
    with pytest.raises(ctl.CtlError, match=r"no admin token at .*/admin-9.token.*--token-file"):
        ctl.admin_token("http://127.0.0.1:9")
    given = tmp_path / "token"
    given.write_text("# the admin token\nfrom-the-file-1\n")
    assert ctl.admin_token("http://127.0.0.1:9", str(given)) == "from-the-file-1"
    assert ctl.admin_token("127.0.0.1:9", environ={"BALLOON_CTL_TOKEN_FILE": str(given)}) == "from-the-file-1"
    given.write_text("short\n")
    with pytest.raises(ctl.CtlError, match="shorter than 8"):
        ctl.admin_token("http://127.0.0.1:9", str(given))
    with pytest.raises(ctl.UsageError, match="port"):
        ctl.admin_token("http://127.0.0.1:notaport")
