"""The policy's knobs: one frozen dataclass, built from defaults and a TOML table.

Defaults are the published ones: oVirt MOM's ``balloon.rules`` (pressure below 20 % host
free, critical below 5 %, keep 20 % of each guest free, at most 5 % of a guest's memory
per step, skip changes under 0.25 %) and ChromeOS concierge's
``BalanceAvailableBalloonPolicy`` / ``BalloonBlocker`` (guest critical level 400 MiB, act
on changes over 1 % of a headroom, block the opposite direction 100 s / 10 s).
Parsing is pure (a dict in, a config out); reading the file is the caller's job.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from shared.runtime.config import parse_duration, parse_size

POLICIES = ("manual", "mom", "balance")
MIB = 1 << 20


class PolicyConfigError(ValueError):
    """A knob is unusable; the message names it."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    policy: str = "manual"
    interval: float = 5.0  # seconds between ticks
    stale_intervals: int = 3  # stats older than this many intervals freeze the guest's target
    # guest floor: never inflate below max(guest_floor, guest_floor_ratio * memory) of available memory;
    # None: the policy's own default (mom: 20 % of memory, balance: 400 MiB)
    guest_floor: int | None = None
    guest_floor_ratio: float | None = None
    max_step_ratio: float = 0.05  # most a balloon changes per tick, of the guest's memory
    min_change_ratio: float = 0.0025  # smaller changes are skipped
    block_low: float = 100.0  # BalloonBlocker block time after a low-priority resize
    block_high: float = 10.0  # ... after a high-priority one
    pressure_deflate_ratio: float = 0.10  # immediate deflate on guest pressure, of memory
    major_fault_rate: float = 100.0  # major faults per second that count as guest pressure
    min_release_ratio: float = 0.10  # released/requested below this over release_window ticks ...
    release_window: int = 5
    release_min_bytes: int = 4 * MIB  # ... with at least this much requested -> "no-release"
    mom_pressure: float = 0.20  # host free ratio below which mom shrinks guests
    mom_critical: float = 0.05  # ... below which shrinking is high priority
    host_critical_ratio: float = 0.05  # balance: host critical level, of host total
    balance_act_ratio: float = 0.01  # balance: act only on moves over this share of a headroom

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise PolicyConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0.05 <= self.interval <= 3600:
            raise PolicyConfigError(f"interval must be 0.05s..1h, got {self.interval}")
        if self.stale_intervals < 1:
            raise PolicyConfigError(f"stale_intervals must be at least 1, got {self.stale_intervals}")
        if self.release_window < 1:
            raise PolicyConfigError(f"release_window must be at least 1, got {self.release_window}")
        for name in ("guest_floor_ratio", "max_step_ratio", "min_change_ratio", "pressure_deflate_ratio",
                     "min_release_ratio", "mom_pressure", "mom_critical", "host_critical_ratio",
                     "balance_act_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise PolicyConfigError(f"{name} must be a fraction 0..1, got {value}")
        if self.max_step_ratio <= 0 or self.pressure_deflate_ratio <= 0:
            raise PolicyConfigError("max_step_ratio and pressure_deflate_ratio must be above 0")
        if self.mom_critical > self.mom_pressure:
            raise PolicyConfigError("mom_critical must not exceed mom_pressure")
        for name in ("block_low", "block_high", "major_fault_rate"):
            if getattr(self, name) < 0:
                raise PolicyConfigError(f"{name} cannot be negative, got {getattr(self, name)}")
        for name in ("guest_floor", "release_min_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise PolicyConfigError(f"{name} cannot be negative, got {value}")

    def floor_for(self, memory_bytes: int) -> int:
        """The guest's available-memory floor for this policy."""
        default_bytes, default_ratio = (400 * MIB, 0.0) if self.policy == "balance" else (0, 0.20)
        floor_bytes = default_bytes if self.guest_floor is None else self.guest_floor
        ratio = default_ratio if self.guest_floor_ratio is None else self.guest_floor_ratio
        return max(floor_bytes, int(ratio * memory_bytes))

    @property
    def block_seconds(self) -> dict[str, float]:
        return {"low": self.block_low, "high": self.block_high}

    def with_table(self, table: dict) -> PolicyConfig:
        """This config with the keys of a TOML table (``policy.toml``) laid over it."""
        return replace(self, **_convert_table(table))

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_SIZES = {"guest_floor", "release_min_bytes"}
_DURATIONS = {"interval", "block_low", "block_high"}
_INTS = {"stale_intervals", "release_window"}


def _convert_table(table: dict) -> dict:
    known = {f.name for f in fields(PolicyConfig)}
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise PolicyConfigError(f"unknown policy setting {key!r} (known: {', '.join(sorted(known))})")
        try:
            if name in _SIZES:
                value = None if value is None else parse_size(value)
            elif name in _DURATIONS:
                value = parse_duration(value)
            elif name in _INTS:
                if type(value) is not int:
                    raise ValueError(f"{value!r} is not an integer")
            elif name != "policy":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{value!r} is not a number")
                value = float(value)
        except ValueError as error:
            raise PolicyConfigError(f"policy setting {key!r}: {error}") from None
        out[name] = value
    return out
