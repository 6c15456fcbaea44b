"""make vm-demo's lines, without a VM (so not under tests/vm/, which skips without QEMU): one
line per step, the agent's pins apart from the rest of the guest's mlocked memory, a verdict."""

from __future__ import annotations

from types import SimpleNamespace

from tests.vm import demo

MIB = 1 << 20


class FakeStack:
    def __init__(self) -> None:
        self.inflated = 0
        self.vm = SimpleNamespace(
            meminfo=lambda: {"MemAvailable": (900 << 20) - self.inflated, "Mlocked": self.inflated + 96 * MIB},
            ram_allocated=lambda: (1024 << 20) - self.inflated,
            run=lambda command, **kw: f"VmLck:\t{self.inflated // 1024} kB\n")

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
    stack.inflated = 0
    d.row(stack, "target 0", 0)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert "target 256  balloon   256 MiB | RAM file   768 MiB (256 MiB given back)" in lines[1]
    # Mlocked at target 0 is not the agent's: said so, not left unexplained
    assert "mlocked: agent     0 MiB, rest of the guest    96 MiB" in lines[2]
    assert d.verdict().startswith("every target reached: 256 MiB (file -256 MiB), 0 MiB (file -0 MiB)")
