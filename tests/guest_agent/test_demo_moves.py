"""make demo moves a balloon by itself, early, and keeps its URLs and hint under the live view."""

from __future__ import annotations

import io
import re

import pytest

from guest_agent import demo

pytestmark = pytest.mark.timeout(120)


def test_the_demo_moves_a_balloon_within_its_first_20_seconds():
    out = io.StringIO()  # not a terminal: the demo prints a status line every 2 s
    d = demo.Demo(20.0, out=out)
    try:
        d.start()
        d.print_urls()
        d.wait_guests()
        d.show()
        footer = d.footer_path.read_text()
    finally:
        d.stop()
    text = out.getvalue()
    inflated = [int(m) for m in re.findall(r"idle: up \S+ inflated=(\d+)MiB", text)]
    assert max(inflated, default=0) == 96, text  # 'setmem idle 160MiB': the whole 96 MiB balloon
    assert "balloonctl setmem idle 160MiB -> idle: keeps 160MiB of 256MiB" in text
    assert f"{d.host_url}/ui/" in footer and "try: .venv/bin/balloonctl" in footer
    assert "last: " in footer and "setmem idle 160MiB ->" in footer
    assert not d.folder.exists()


def test_the_footer_is_what_balloonctl_top_shows_under_each_frame(tmp_path):
    from balloonctl.commands import footer_lines

    path = tmp_path / "footer.txt"
    path.write_text("dashboard http://127.0.0.1:1/ui/\n" + "try: balloonctl setmem idle 192MiB " * 4 + "\n")
    lines = footer_lines(str(path), 60)
    assert lines[0] == "" and lines[1] == "dashboard http://127.0.0.1:1/ui/"
    assert all(len(line) <= 60 for line in lines) and len(lines) > 3  # wrapped, never cut
    assert footer_lines(str(tmp_path / "missing"), 60) == []
