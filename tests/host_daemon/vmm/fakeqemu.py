"""A QMP server that answers like QEMU 7.2 for the commands the host asks, on a Unix socket.

The wire is QMP's (docs/interop/qmp-spec: a greeting, ``qmp_capabilities``, then one JSON
object per command, ``{"return": ...}`` or ``{"error": {...}}`` with the same ``id``, and
events in between), so the host's real client (``qemu.qmp``) talks to it unchanged. The
VM's state is plain attributes a test changes: ``migration``, ``devices``, ``balloon``,
``delay`` (seconds before each answer: a slow QEMU).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

GIB = 1 << 30


def mtree(memory: int, below_4g: int, backend: str = "mem") -> str:
    """HMP ``info mtree`` (tree view) with the aliases QEMU's pc/q35 machines create."""
    lines = ["address-space: memory", "  0000000000000000-ffffffffffffffff (prio 0, i/o): system"]
    below = min(memory, below_4g)
    lines.append(f"    0000000000000000-{below - 1:016x} (prio 0, ram): alias ram-below-4g @{backend} "
                 f"0000000000000000-{below - 1:016x}")
    if memory > below:
        above = memory - below
        lines.append(f"    0000000100000000-{(1 << 32) + above - 1:016x} (prio 0, ram): alias ram-above-4g "
                     f"@{backend} {below:016x}-{memory - 1:016x}")
    lines.append("    00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram")
    return "\n".join(lines + [""])


async def _requests(reader: asyncio.StreamReader):
    """JSON objects as they complete: QEMU's parser is a stream parser, and qemu.qmp
    sends pretty-printed, multi-line objects."""
    decoder, buffer = json.JSONDecoder(), ""
    while chunk := await reader.read(65536):
        buffer += chunk.decode()
        while True:
            buffer = buffer.lstrip()
            try:
                request, end = decoder.raw_decode(buffer)
            except ValueError:
                break
            buffer = buffer[end:]
            yield request


class FakeQemu:
    def __init__(self, path: Path, memory: int = 8 * GIB, below_4g: int = 3 * GIB,
                 mem_path: str = "/dev/shm/vm.ram", share: bool = True) -> None:
        self.path = Path(path)
        self.memory = memory
        self.below_4g = below_4g
        self.mem_path = mem_path
        self.share = share
        self.migration: str | None = None  # query-migrate status
        self.jobs: list[dict] = []
        self.devices: dict[str, str] = {"balloon0": "child<virtio-balloon-pci>"}
        self.balloon_actual = memory
        self.stats = {"stat-free-memory": 6 * GIB, "stat-total-memory": memory - GIB,
                      "stat-available-memory": 7 * GIB, "stat-swap-in": (1 << 64) - 1}  # never sent: QEMU shows (uint64)-1
        self.stats_updated = int(time.time())
        self.stats_interval = 0
        self.delay = 0.0
        self.commands: list[str] = []
        self.capabilities: list = []
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> FakeQemu:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def stop(self) -> None:
        """QEMU exits: the socket goes and every monitor connection drops."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    def event(self, name: str, data: dict | None = None) -> None:
        now = time.time()
        message = {"event": name, "data": data or {},
                   "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        for writer in list(self._writers):
            writer.write(json.dumps(message).encode() + b"\r\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            greeting = {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""},
                                "capabilities": []}}
            writer.write(json.dumps(greeting).encode() + b"\r\n")
            async for request in _requests(reader):
                command = request.get("execute")
                self.commands.append(command)
                if self.delay:
                    await asyncio.sleep(self.delay)
                try:
                    reply = {"return": self._answer(command, request.get("arguments", {}))}
                except LookupError as error:
                    reply = {"error": {"class": "GenericError", "desc": str(error)}}
                if "id" in request:
                    reply["id"] = request["id"]
                writer.write(json.dumps(reply).encode() + b"\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _answer(self, command: str, arguments: dict):
        if command == "qmp_capabilities":
            return {}
        if command == "migrate-set-capabilities":
            self.capabilities = arguments["capabilities"]
            return {}
        if command == "human-monitor-command" and arguments.get("command-line") == "info mtree":
            return mtree(self.memory, self.below_4g)
        if command == "query-migrate":
            return {} if self.migration is None else {"status": self.migration}
        if command == "query-jobs":
            return self.jobs
        if command == "qom-list":
            if arguments["path"] == "/machine/peripheral":
                return [{"name": name, "type": kind} for name, kind in self.devices.items()]
            if arguments["path"] == "/machine/peripheral-anon":
                return []
            raise LookupError(f"Device '{arguments['path']}' not found")
        if command == "qom-get":
            return self._qom_get(arguments["path"], arguments["property"])
        if command == "qom-set":
            if arguments["property"] == "guest-stats-polling-interval":
                self.stats_interval = arguments["value"]
                return {}
            raise LookupError(f"Property '{arguments['property']}' not found")
        if command == "query-balloon":
            if not any("balloon" in kind for kind in self.devices.values()):
                raise LookupError("No balloon device has been activated")
            return {"actual": self.balloon_actual}
        if command == "balloon":
            self.balloon_actual = arguments["value"]
            self.event("BALLOON_CHANGE", {"actual": self.balloon_actual})
            return {}
        raise LookupError(f"The command {command} has not been found")

    def _qom_get(self, path: str, name: str):
        if path == "/objects/mem":
            if name == "mem-path":
                return self.mem_path
            if name == "share":
                return self.share
        if path == "/machine/peripheral/balloon0" and name == "guest-stats":
            return {"stats": self.stats, "last-update": self.stats_updated}
        raise LookupError(f"Property '{name}' not found")
