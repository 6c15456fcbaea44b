"""What balloonctl prints: sizes for people, titles and tables that fit the terminal."""

from __future__ import annotations

import pytest

from balloonctl.render import (
    human_bound,
    human_bytes,
    human_seconds,
    render_policy,
    render_table,
    status_title,
    wrap,
)


def test_sizes_and_durations_for_people():
    assert human_bytes(3 << 30) == "3GiB" and human_bytes(None) == "-"
    assert human_seconds(250e-6) == "250µs" and human_seconds(0.0123) == "12.30ms"


def test_a_p99_is_shown_as_the_bucket_edge_it_is():
    assert [human_bound(v) for v in (25e-6, 250e-6, 2.5e-3, 0.5, 1.0, None)] == [
        "<=25µs", "<=250µs", "<=2.5ms", "<=500ms", "<=1s", "-"]


def test_totals_count_connected_guests_and_titles_wrap_whole():
    """A finished balloon-load guest stays listed (retention) but its memory is not in the totals;
    the title is wrapped between words at 120 columns, never cut with an ellipsis."""
    guests = [_guest("a"), _guest("gone", connected=False)]
    title = status_title(guests, "http://127.0.0.1:9470")
    assert title == "balloon-host 127.0.0.1:9470: 1 guest up (1 down); memory 256MiB, actual 192MiB, reported 150MiB"
    long = "12:00:00 " + title + "; 12.5 batches/s (every 1s, q quits)" + " and more words" * 5
    lines = wrap(long, 120)
    assert len(lines) >= 2 and all(len(line) <= 120 for line in lines)
    assert " ".join(part.strip() for part in lines) == long


def _guest(gid: str, **extra) -> dict:
    return {"id": gid, "connected": True, "memory_bytes": 256 << 20, "actual_bytes": 192 << 20,
            "inflated_bytes": 64 << 20, "target_bytes": 64 << 20, "target_state": "reached",
            "reported_bytes": 150 << 20, "unused_bytes": 170 << 20, "stats_age_seconds": 2.0,
            "reclaimed_bytes": None, "window": {"size": 16, "in_use": 0}, "apply_seconds_p99": 2e-5,
            "apply_seconds_p99_recent": 2.5e-5, "usable_bytes": 180 << 20, "batches": {"report": 7}, "rejected_pages": {}, "errors": 0, "last_message_at": None, **extra}


@pytest.mark.parametrize("width", [80, 60, 40])
def test_narrow_terminals_drop_whole_columns_never_ids_or_digits(width):
    guests = [_guest("a-rather-long-guest-name-01"), _guest("burst"),
              _guest("churn", target_state="unreachable", target_bytes=250 << 20)]
    rates = {"burst": {"batches_per_s": 12.5, "report_bytes_per_s": 4 << 20, "inflate_bytes_per_s": 0}}
    lines = render_table(guests, rates, width)
    assert all(len(line) <= width for line in lines if not line.startswith("a-rather")), lines
    body = lines[1:4]
    assert [line.split()[0] for line in body] == ["a-rather-long-guest-name-01", "burst", "churn"]
    header = lines[0].split()
    if width >= 80:  # the numbers that matter: kept at 80 columns
        assert {"guest", "actual", "balloon", "reported", "memory", "target"} <= set(header)
        assert "usable" in render_table(guests[1:], rates, width)[0]  # short ids leave room for more
        assert "250MiB!" in body[2] and "192MiB" in body[0]
    assert any(line.startswith("(hidden for width:") for line in lines)
    assert "…" not in "".join(body)
    assert render_table(guests, rates, None)[0].split()[:3] == ["guest", "up", "memory"]  # pipe: all columns
    assert len(render_table(guests, rates, None)[0].split()) > len(header)


def test_render_policy_drops_columns_on_narrow_terminals():
    answer = {"policy": "balance", "source": "budget", "guest_memory_budget": 1 << 30, "interval_s": 5.0,
              "last_tick_age_s": 1.0, "host": {"available_bytes": 1 << 28, "total_bytes": 1 << 30,
                                               "free_ratio": 0.25, "pressure_some": 0.0, "pressure_full": 0.0},
              "decisions": [{"guest": "vm-with-a-long-name", "direction": "hold", "target_bytes": 0,
                             "previous_bytes": 0, "reason": "blocked", "rule": "rail:blocker",
                             "detail": {"blocked_for_s": 42.0, "wanted": "inflate", "available_bytes": 1 << 29,
                                        "floor_bytes": 1 << 28, "balloon_bytes": 0}}]}
    wide = render_policy(answer, None)
    assert "inflate held 42s more" in wide[2] and "budget 1GiB" in wide[0]
    answer["decisions"][0]["detail"].update(backoff_s=200.0, emergencies=2)
    assert "inflate held 42s more (backoff 3m after 2 emergency deflates)" in render_policy(answer, None)[2]
    narrow = render_policy(answer, 40)
    header = next(i for i, line in enumerate(narrow) if line.startswith("guest"))  # after the wrapped title
    assert header > 1 and all(len(line) <= 40 for line in narrow[:header])
    row = narrow[header + 1]
    assert "vm-with-a-long-name" in row and "blocked" in row and "note" not in narrow[header]


def test_status_shows_the_driver_and_the_vmm_link():
    base = {"memory_bytes": 1 << 30, "actual_bytes": 1 << 30, "inflated_bytes": 0, "reported_bytes": 0}
    guests = [
        {**base, "id": "agent1", "connected": True, "driver": "agent", "vmm": None},
        {**base, "id": "stock1", "connected": False, "driver": "virtio-balloon",
         "vmm": {"state": "connected", "discard_blocked": None}},
        {**base, "id": "vm3", "connected": True, "driver": "agent",
         "vmm": {"state": "connected", "discard_blocked": "migration"}},
        {**base, "id": "vm4", "connected": False, "driver": None, "vmm": {"state": "unreachable"}},
    ]
    lines = render_table(guests, None, None)
    header = lines[0].split()
    rows = {line.split()[0]: dict(zip(header, line.split(), strict=False)) for line in lines[1:]}
    assert rows["agent1"]["up"] == "up" and rows["agent1"]["vmm"] == "-" and rows["agent1"]["driver"] == "agent"
    assert rows["stock1"]["up"] == "vmm" and rows["stock1"]["vmm"] == "ok" and rows["stock1"]["driver"] == "virtio"
    assert rows["vm3"]["vmm"] == "held:migration"
    assert rows["vm4"]["up"] == "down" and rows["vm4"]["vmm"] == "down"
