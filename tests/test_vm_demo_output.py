"""make vm-demo's lines, without a VM (so not under tests/vm/, which skips without QEMU): one
line per step, the agent's pins apart from the rest of the guest's mlocked memory, a verdict."""

from __future__ import annotations

from types import SimpleNamespace

from tests.vm import demo

MIB = 1 << 20


class FakeStack:
    def __init__(self) -> None:
        self.inflated = 0
        self.unmapped_late = 0  # what the agent still pins although the host counts it deflated
        self.vm = SimpleNamespace(ram_allocated=lambda: (1024 << 20) - self.inflated, run=self.run)

    def run(self, command: str, **kw) -> str:
        locked = self.inflated + self.unmapped_late
        self.unmapped_late = 0  # by the next look the agent has unmapped it
        return (f"VmLck:\t{locked // 1024} kB\nMemAvailable:\t{((900 << 20) - locked) // 1024} kB\n"
                f"Mlocked:\t{(locked + 8 * MIB) // 1024} kB\n")

    def guest(self) -> dict:
        return {"inflated_bytes": self.inflated}

    def agent_pids(self) -> list[int]:
        return [42]


def test_each_step_is_one_line_and_the_verdict_has_the_figures(capsys):
    d = demo.Demo([256, 0])
    stack = FakeStack()
    d.row(stack, "connected")
    stack.inflated = 256 * MIB
    d.row(stack, "target 256", 256)
    stack.inflated, stack.unmapped_late = 0, 16 * MIB  # the host counted the deflate before the agent unmapped
    d.row(stack, "target 0", 0)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert "target 256  balloon   256 MiB | RAM file   768 MiB (256 MiB given back)" in lines[1]
    # at target 0 the line waits for the agent's pins to match the balloon, then tells them apart
    assert "mlocked: agent     0 MiB, rest of the guest     8 MiB" in lines[2]
    assert d.verdict().startswith("every target reached: 256 MiB (file -256 MiB), 0 MiB (file -0 MiB)")
