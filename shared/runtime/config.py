"""Layered settings for the command-line tools: flag > environment > TOML file > default.

Both daemons describe their options once, as an argparse parser; this module lays the
environment (``PREFIX_FLAG_NAME``) and a config file's table over the defaults before
the command line is applied. ``resolve_settings`` reads nothing itself (callers pass
``os.environ`` and the parsed table), which keeps it testable; ``load_config_table`` is
the one place that reads a config file, for both daemons.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import Any

#: QEMU's size suffixes (``qemu_strtosz``: K, M, G, T are powers of 1024) plus the IEC
#: spellings. ``KB``/``MB``/``GB``/``TB`` are refused: half the world reads them as 10**n
#: and the other half as 2**n, and a guest size off by 5 % is a silent surprise.
_SIZE = re.compile(r"\s*(\d{1,20}(?:\.\d{1,20})?)\s*([A-Za-z]*)\s*")
_SIZE_FACTORS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "ki": 1 << 10,
                 "m": 1 << 20, "mib": 1 << 20, "mi": 1 << 20, "g": 1 << 30, "gib": 1 << 30, "gi": 1 << 30,
                 "t": 1 << 40, "tib": 1 << 40, "ti": 1 << 40}
_AMBIGUOUS = {"kb": "KiB", "mb": "MiB", "gb": "GiB", "tb": "TiB"}
#: Larger than any machine (16 EiB - 1, a u64): bigger numbers are a typo, not a size.
MAX_SIZE = (1 << 64) - 1
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_DURATION_FACTORS = {None: 1.0, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str | int) -> int:
    """``512MiB``, ``512M``, ``8G``, ``1.5GiB``, ``4096`` (bytes) → bytes.

    As QEMU's ``-m``: ``K``/``M``/``G``/``T`` (any case) are binary, like ``KiB``/``MiB``/...;
    a bare number is bytes. ``MB`` and friends are refused as ambiguous (ValueError naming
    the two readings), so ``256MB`` never silently means 256,000,000 bytes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if not 0 <= text <= MAX_SIZE:
            raise ValueError(f"{text} is not a size between 0 and 16EiB")
        return text
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(f"{str(text)[:40]!r} is not a size (try 512MiB, 8GiB or a byte count)")
    number, unit = match.group(1), match.group(2).lower()
    if unit in _AMBIGUOUS:
        raise ValueError(f"{text!r} is ambiguous: write {number}{_AMBIGUOUS[unit]} (binary, QEMU's "
                         f"{unit[0].upper()}) or the byte count")
    if unit not in _SIZE_FACTORS:
        raise ValueError(f"{text!r} is not a size: unknown unit {match.group(2)!r} (use K/M/G/T or KiB/MiB/GiB/TiB)")
    whole, _, fraction = number.partition(".")
    factor = _SIZE_FACTORS[unit]
    value = int(whole) * factor + (int(fraction) * factor // 10 ** len(fraction) if fraction else 0)
    if value > MAX_SIZE:
        raise ValueError(f"{text!r} is larger than 16EiB")
    return value


def format_size(value: int | float | None) -> str:
    """Bytes for people: ``256MiB``, ``1.5GiB``, ``2TiB``, ``812B`` (what parse_size reads back)."""
    if value is None:
        return "-"
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value > MAX_SIZE:  # a client's 400-digit number: no float can hold it
        return f"{sign}more than 16EiB"
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= factor:
            scaled = value / factor
            text = f"{scaled:.0f}" if scaled == int(scaled) or scaled >= 100 else f"{scaled:.1f}"
            return f"{sign}{text}{unit}"
    return f"{sign}{value:.0f}B"


def parse_duration(text: str | float | int) -> float:
    """``2s``, ``500ms``, ``1.5`` (seconds), ``5m`` → seconds."""
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return float(text)
    match = _DURATION.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration (try 2s, 500ms or 5m)")
    return float(match.group(1)) * _DURATION_FACTORS[match.group(2)]


class ConfigFileError(ValueError):
    """The --config file cannot be read or is not the expected TOML."""


def read_toml(path, option: str, error: type[Exception] | None = None) -> dict:
    """A TOML file named by ``option`` (e.g. ``--config``); ``error`` (ConfigFileError unless
    given) carries one line naming the option and the file when it can't be read or parsed."""
    import tomllib

    error = error or ConfigFileError
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as problem:
        raise error(f"{option}: cannot read {path}: {problem.strerror or problem}") from None
    except tomllib.TOMLDecodeError as problem:
        raise error(f"{option}: {path} is not valid TOML: {problem}") from None


def load_config_table(path, table: str) -> dict:
    """The ``[table]`` of a TOML file, or its top level when it has no such table."""
    data = read_toml(path, "--config")
    section = data.get(table, data)
    if not isinstance(section, dict):
        raise ConfigFileError(f"--config: {path}: [{table}] must be a table")
    return section


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (exit 2), not the usage block.

    The full usage is one ``--help`` away; a daemon started from a unit file or a script
    should leave one greppable line saying what was wrong.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def argument_type(function, name: str):
    """An argparse ``type=`` that keeps ``function``'s ValueError text in the usage error.

    argparse turns a plain ValueError into "invalid <name> value"; the parsers here say
    what form was expected, which is worth showing.
    """
    def convert(text):
        try:
            return function(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name
    return convert


def _truthy(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def _convert(action: argparse.Action, value: Any, source: str, parser: argparse.ArgumentParser) -> Any:
    try:
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return _truthy(value) if isinstance(value, str) else bool(value)
        if isinstance(action, argparse._AppendAction):
            items = [part for part in value.split(",") if part] if isinstance(value, str) else list(value)
            return [_one(action, item) for item in items]
        return _one(action, value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        parser.error(f"{source}: {error}")


def _one(action: argparse.Action, value: Any) -> Any:
    if action.type is not None and isinstance(value, str):
        value = action.type(value)
    elif action.type in (float,) and isinstance(value, int):
        value = float(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def env_name(prefix: str, dest: str) -> str:
    return f"{prefix}_{dest.upper()}"


def resolve_settings(parser: argparse.ArgumentParser, argv, env_prefix: str,
                     environ: Mapping[str, str], file_settings: Mapping[str, Any] | None = None
                     ) -> argparse.Namespace:
    """Parse ``argv`` with environment and file values as the new defaults.

    A repeatable flag given on the command line replaces (not extends) the value from the
    file or environment, as an operator overriding a unit file would expect. Unknown keys
    in the file are an error, so a typo never silently keeps a default.
    """
    actions = {action.dest: action for action in parser._actions
               if action.option_strings and action.dest not in ("help", "version", "config")}
    saved = {dest: action.default for dest, action in actions.items()}
    for action in actions.values():
        action.default = argparse.SUPPRESS
    try:
        given = vars(parser.parse_args(argv))
    finally:
        for dest, default in saved.items():
            actions[dest].default = default
    # argparse converts string defaults through ``type`` only when it applies them itself.
    values = {dest: (action.type(saved[dest]) if isinstance(saved[dest], str) and action.type else saved[dest])
              for dest, action in actions.items()}
    for key, value in (file_settings or {}).items():
        dest = key.replace("-", "_")
        if dest not in actions:
            parser.error(f"config file: unknown setting {key!r}")
        values[dest] = _convert(actions[dest], value, f"config file setting {key!r}", parser)
    for dest, action in actions.items():
        name = env_name(env_prefix, dest)
        if name in environ:
            values[dest] = _convert(action, environ[name], f"environment variable {name}", parser)
    values.update(given)
    return argparse.Namespace(**values)


def add_common_options(parser: argparse.ArgumentParser, table: str) -> None:
    """--config, --log-format and --log-level, spelled the same for every daemon."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"TOML file with option names as keys (top level or in a [{table}] table)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="least severe level logged")


def layered_settings(parser: argparse.ArgumentParser, argv, env_prefix: str,
                     environ: Mapping[str, str], table: str) -> argparse.Namespace:
    """What a daemon's ``main`` needs: --help, the --config file (flag or environment), layers.

    ``--help`` is answered before the defaults are hidden (so help texts show them); the
    config file comes from ``--config`` or ``PREFIX_CONFIG`` and its ``[table]`` is laid
    under the environment and the command line. Raises ConfigFileError for a bad file.
    """
    argv = list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        parser.parse_args(["--help"])  # exits 0
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    config = known.config or environ.get(env_name(env_prefix, "config")) or None
    file_settings = load_config_table(config, table) if config else None
    return resolve_settings(parser, argv, env_prefix, environ, file_settings)


def describe_layers(prefix: str, example: str = "max-guests") -> str:
    """The epilog both daemons print under --help (``example``: one of that daemon's options)."""
    return (f"Every option can also come from the environment as {prefix}_<OPTION> (e.g. "
            f"--{example} → {prefix}_{example.upper().replace('-', '_')}; repeatable options take a comma-separated "
            f"list) or from a TOML file given with --config (keys as option names). "
            f"Precedence: command line > environment > config file > default.")
