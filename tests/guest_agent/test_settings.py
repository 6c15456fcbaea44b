"""balloon-guest options: every flag documented, layered flag > env > TOML > default, clear errors."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from guest_agent.client import backoff_delay
from guest_agent.settings import SettingsError, build_parser, parse_settings

FLAGS = ["--connect", "--id", "--memory", "--source", "--workload", "--utilization", "--rate", "--size-mix",
         "--seed", "--report-order", "--report-delay", "--capacity", "--http", "--token-file", "--shared-ram",
         "--pfn32", "--features", "--config", "--log-format", "--log-level"]


def test_help_explains_every_flag():
    text = build_parser().format_help()
    for flag in FLAGS:
        assert flag in text
    assert "BALLOON_GUEST_" in text
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_help_names_only_defaults_that_say_something():
    """``--no-reporting (default: True)`` reads as "reporting is off by default"; None says nothing."""
    text = " ".join(build_parser().format_help().split())
    for noise in ("(default: None)", "(default: True)", "(default: False)", "(default: [])"):
        assert noise not in text
    assert "(default: 50ms)" in text  # a real default is still shown
    assert "BALLOON_GUEST_STATS_INTERVAL" in text  # the epilog's example is a guest option


def test_defaults_follow_linux_page_reporting():
    s = parse_settings(["--id", "g1"], {})
    assert (s.report_order, s.report_delay, s.capacity) == (9, 2.0, 32)
    assert s.http == ("127.0.0.1", 9471) and s.http_auto  # the first free port from 9471
    assert parse_settings(["--id", "g1", "--http", "127.0.0.1:9480"], {}).http_auto is False
    assert parse_settings(["--id", "g1", "--http", "off"], {}).http is None
    assert s.memory == 512 << 20 and s.pages == 131072
    assert s.offered_features() == ("ranges52", "stats", "deflate-on-oom")


def test_flag_beats_env_beats_toml(tmp_path):
    config = tmp_path / "guest.toml"
    config.write_text('[guest]\nmemory = "1GiB"\nworkload = "churn"\nreport-delay = "5s"\ncapacity = 8\n')
    env = {"BALLOON_GUEST_WORKLOAD": "burst", "BALLOON_GUEST_CAPACITY": "16", "BALLOON_GUEST_PFN32": "true"}
    s = parse_settings(["--config", str(config), "--id", "g1", "--capacity", "4"], env)
    assert s.memory == 1 << 30  # TOML
    assert s.workload == "burst"  # env over TOML
    assert s.capacity == 4  # flag over env
    assert s.report_delay == 5.0
    assert s.pfn32 and s.offered_features()[0] == "pfn32"


def test_shared_ram_and_features(tmp_path):
    s = parse_settings(["--id", "g1", "--shared-ram"], {})
    assert "shared-ram" in s.offered_features()
    s = parse_settings(["--id", "g1", "--features", "ranges52,stats"], {})
    assert s.offered_features() == ("ranges52", "stats")
    s = parse_settings(["--id", "g1", "--source", "procfs", "--memory", "64MiB"], {})
    assert "hinting" in s.offered_features() and "deflate-on-oom" not in s.offered_features()


@pytest.mark.parametrize("argv, fragment", [
    (["--id", "bad/id"], "--id"),
    (["--id", "g", "--memory", "3MiB"], "--memory"),
    (["--id", "g", "--workload", "nap"], "--workload"),
    (["--id", "g", "--workload", "trace:/nonexistent/trace"], "trace file"),
    (["--id", "g", "--capacity", "0"], "--capacity"),
    (["--id", "g", "--report-order", "11"], "--report-order"),
    (["--id", "g", "--features", "warp-drive"], "--features"),
    (["--id", "g", "--token-file", "/nonexistent/token"], "--token-file"),
])
def test_unusable_values_name_the_option(argv, fragment):
    with pytest.raises(SettingsError, match=fragment.replace("-", r"\-")):
        parse_settings(argv, {})


def test_bad_syntax_exits_2_with_one_line():
    result = subprocess.run([sys.executable, "-m", "guest_agent", "--memory", "lots"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--memory" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "guest_agent", "--id", "x/y"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--id" in result.stderr and "Traceback" not in result.stderr


def test_bad_toml_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("memory = [")
    with pytest.raises(SettingsError, match="not valid TOML"):
        parse_settings(["--config", str(config)], {})
    config.write_text('colour = "blue"\n')
    with pytest.raises(SystemExit):
        parse_settings(["--config", str(config)], {})


def test_backoff_grows_with_jitter_and_is_capped():
    rng = random.Random(1)
    delays = [backoff_delay(n, 3.0, rng) for n in range(12)]
    assert all(0 < d <= 3.0 for d in delays)
    assert delays[0] <= 0.1 and delays[-1] >= 1.5
    assert len({round(backoff_delay(8, 3.0, rng), 6) for _ in range(20)}) > 1  # jittered


@pytest.mark.parametrize("args, message", [
    (["--workload", "trace:{bad}"], "trace line 2: id 'a' freed with another order"),
    (["--workload", "trace:{missing}"], "cannot read trace file"),
    (["--size-mix", "0:x"], "--size-mix: '0:x' is not ORDER:WEIGHT"),
    (["--size-mix", "12:1"], "--size-mix: order 12 is not in 0..10"),
    (["--memory", "256MB"], "ambiguous: write 256MiB"),
    (["--memory", "1000000"], "got 977KiB (1000000 bytes)"),
])
def test_bad_guest_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    from guest_agent import cli

    bad = tmp_path / "bad.trace"
    bad.write_text("0 alloc 0 a\n1 free 1 a\n")
    args = [a.format(bad=bad, missing=tmp_path / "nope") for a in args]
    try:
        status = cli.main(["--http", "off", "--id", "g1", *args])
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    err = capsys.readouterr().err
    assert status == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
