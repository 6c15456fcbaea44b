"""Layered settings: command line > environment > config file > default."""

import argparse

import pytest

from shared.runtime.config import format_size, parse_duration, parse_size, resolve_settings


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--listen", action="append", default=["unix:/default.sock"])
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--memory", type=parse_size, default="1GiB")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--verbose", action="store_true")
    return parser


def test_defaults_are_converted_through_their_type():
    settings = resolve_settings(make_parser(), [], "T", {}, {})
    assert settings.memory == 1 << 30
    assert settings.listen == ["unix:/default.sock"]
    assert settings.verbose is False


def test_precedence_flag_over_env_over_file():
    file = {"window": 4, "memory": "256MiB", "log-format": "json"}
    env = {"T_WINDOW": "8"}
    settings = resolve_settings(make_parser(), ["--memory", "2GiB"], "T", env, file)
    assert settings.window == 8  # env beats file
    assert settings.memory == 2 << 30  # flag beats file
    assert settings.log_format == "json"  # file beats default


def test_repeatable_flag_on_command_line_replaces_env_list():
    env = {"T_LISTEN": "tcp:127.0.0.1:1,unix:/b"}
    assert resolve_settings(make_parser(), [], "T", env, {}).listen == ["tcp:127.0.0.1:1", "unix:/b"]
    assert resolve_settings(make_parser(), ["--listen", "unix:/c"], "T", env, {}).listen == ["unix:/c"]


def test_env_booleans():
    assert resolve_settings(make_parser(), [], "T", {"T_VERBOSE": "yes"}, {}).verbose is True
    with pytest.raises(SystemExit):
        resolve_settings(make_parser(), [], "T", {"T_VERBOSE": "maybe"}, {})


@pytest.mark.parametrize("env, file", [
    ({"T_WINDOW": "many"}, {}),
    ({}, {"no-such-option": 1}),
    ({}, {"log-format": "xml"}),
    ({"T_MEMORY": "lots"}, {}),
])
def test_bad_values_exit_with_a_message_naming_the_source(env, file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        resolve_settings(make_parser(), [], "T", env, file)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ("environment variable" in err) or ("config file" in err)


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096), ("512MiB", 512 << 20), ("8GiB", 8 << 30), ("1.5KiB", 1536), (123, 123),
    ("256M", 256 << 20), ("256m", 256 << 20), ("2G", 2 << 30), ("4k", 4096), ("1T", 1 << 40),  # QEMU: M = MiB
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "5 pages", "1XB", "9" * 400, "1" + "0" * 19 + "T", -1])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text, spelled", [("256MB", "256MiB"), ("2gb", "2GiB"), ("4KB", "4KiB"), ("1TB", "1TiB")])
def test_decimal_looking_units_are_refused_as_ambiguous_with_the_fix_in_the_message(text, spelled):
    with pytest.raises(ValueError, match=f"ambiguous: write {spelled}"):
        parse_size(text)


def test_format_size_of_an_absurd_number_does_not_overflow():
    assert format_size(10 ** 400) == "more than 16EiB"


@pytest.mark.parametrize("value, text", [(0, "0B"), (812, "812B"), (4096, "4KiB"), (256 << 20, "256MiB"),
                                         (3 << 29, "1.5GiB"), (2 << 40, "2TiB"), (-(64 << 20), "-64MiB")])
def test_format_size_reads_back_through_parse_size(value, text):
    assert format_size(value) == text
    if value >= 0:
        assert parse_size(text) == value


@pytest.mark.parametrize("text, expected", [("2s", 2.0), ("500ms", 0.5), ("1.5", 1.5), ("5m", 300.0), (3, 3.0)])
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "soon", "-2s", "5d"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_layered_settings_reads_the_table_named_by_flag_or_environment(tmp_path):
    from shared.runtime.config import ConfigFileError, layered_settings

    config = tmp_path / "balloon.toml"
    config.write_text('[tool]\nwindow = 4\nmemory = "256MiB"\n')
    parser = make_parser()
    parser.add_argument("--config")
    from_flag = layered_settings(parser, ["--config", str(config)], "T", {"T_WINDOW": "8"}, "tool")
    assert (from_flag.window, from_flag.memory) == (8, 256 << 20)  # env over file
    from_env = layered_settings(parser, [], "T", {"T_CONFIG": str(config)}, "tool")
    assert (from_env.window, from_env.memory) == (4, 256 << 20)
    config.write_text("window = [")
    with pytest.raises(ConfigFileError):
        layered_settings(parser, ["--config", str(config)], "T", {}, "tool")
    with pytest.raises(ConfigFileError):
        layered_settings(parser, ["--config", str(tmp_path / "missing.toml")], "T", {}, "tool")
