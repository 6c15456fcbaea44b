"""One QEMU guest for a test: boot, run shell commands on its console, stop, clean up.

The guest (docs/OPERATIONS.md "Real VMs"): Debian's kernel booted as an uncompressed
``vmlinux`` (PVH) under TCG — KVM only where :func:`harness.kvm_usable` — with

* its RAM in a shared file (``memory-backend-file,share=on``) on the ``pc`` machine, so for a
  guest under 3 GiB a PFN times 4096 is the file offset, the host daemon punches the file,
  and the test reads ``st_blocks`` (never an mmap of the file: read faults on tmpfs holes
  would allocate the pages again);
* a virtio-serial port ``org.balloon.0`` whose chardev dials the host daemon's Unix
  listener (``server=off,reconnect=1``: QEMU redials a second after the host went away);
* the host's ``/`` over a read-only 9p share, mounted on ``/mnt`` with /proc, /sys, /dev and a
  tmpfs /tmp inside, so ``chroot /mnt`` runs this checkout's own ``.venv`` — the project's
  agent, unchanged, inside the guest;
* its console (ttyS0) on QEMU's stdio: a busybox shell without echo that :meth:`run` drives
  with an end marker per command.

Every QEMU runs under ``timeout -s KILL`` so a harness that dies cannot leave it behind, and
:meth:`close` kills it and deletes the RAM file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import harness

REPO = Path(__file__).resolve().parents[2]
PORT = f"/dev/virtio-ports/{harness.PORT_NAME}"


def _tmp_keep(repo: Path) -> str:
    """The kernel-command-line word that keeps a checkout under the host's /tmp visible in the
    guest, whose /tmp is a fresh tmpfs (harness.INIT binds that one folder back in)."""
    try:
        top = repo.relative_to("/tmp").parts[0]
    except (ValueError, IndexError):
        return ""
    return f" balloon.tmpkeep={top}"
#: The guest's environment for the project's Python: no JIT under TCG (numba's compile
#: would take minutes there), a writable tmpfs for caches, nothing from the host's shell.
GUEST_ENV = "env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp TMPDIR=/tmp BALLOON_CODEC=numpy " \
            "PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1"


class GuestError(AssertionError):
    """A console command failed or timed out; carries the console's last lines."""


class Machine:
    def __init__(self, artifacts: harness.Artifacts, folder: Path, *, memory_mib: int = 1024,
                 socket_path: Path | None = None, ram_file: Path | None = None, prealloc: bool = False,
                 qemu_balloon: bool = False, free_page_reporting: bool = False, lifetime: float = 600,
                 name: str = "vm1", machine: str = "pc", hostroot: bool = True, host_qmp: bool = False,
                 zero_fill: bool = False) -> None:
        self.artifacts = artifacts
        self.folder = Path(folder)
        self.name = name
        self.memory_mib = memory_mib
        self.socket_path = socket_path
        self.ram_file = ram_file or (self.folder / f"{name}.ram")
        self.prealloc = prealloc
        self.qemu_balloon = qemu_balloon or free_page_reporting
        self.free_page_reporting = free_page_reporting
        self.lifetime = lifetime
        self.machine = machine  # "pc" or "q35": where the PCI hole splits RAM differs
        self.hostroot = hostroot  # the host's / over 9p (QEMU refuses to migrate while it is mounted)
        self.zero_fill = zero_fill  # write zeros to the RAM file before boot: every page backed, fast
        self.qmp_path = self.folder / f"{name}.qmp"
        #: a second QMP monitor, for the host daemon (the test keeps ``qmp_path``)
        self.host_qmp_path = self.folder / f"{name}.host.qmp" if host_qmp else None
        self.console_log = self.folder / f"{name}.console.log"
        self.popen: subprocess.Popen | None = None
        self.boot_seconds: float | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._marks = itertools.count(1)
        self._reader: threading.Thread | None = None
        self.repo = REPO

    # -- lifecycle ------------------------------------------------------------------------

    def argv(self) -> list[str]:
        size = f"{self.memory_mib}M"
        backend = f"memory-backend-file,id=mem,size={size},mem-path={self.ram_file},share=on"
        if self.prealloc:
            backend += ",prealloc=on"
        kvm = harness.kvm_usable()
        argv = ["timeout", "-s", "KILL", str(int(self.lifetime)), harness.QEMU,
                "-accel", "kvm" if kvm else "tcg", "-cpu", "host" if kvm else "max", "-smp", "1",
                "-m", size, "-object", backend, "-machine", f"{self.machine},memory-backend=mem",
                "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-net", "none",
                "-kernel", str(self.artifacts.vmlinux), "-initrd", str(self.artifacts.initramfs),
                "-append", "console=ttyS0 panic=-1 quiet loglevel=3 init_on_alloc=0"
                + (" balloon.hostroot" if self.hostroot else "")
                + (" balloon.port" if self.socket_path is not None else "") + _tmp_keep(self.repo),
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.hostroot:
            argv += ["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"]
        if self.host_qmp_path is not None:
            argv += ["-qmp", f"unix:{self.host_qmp_path},server=on,wait=off"]
        if self.socket_path is not None:
            argv += ["-device", "virtio-serial-pci",
                     "-chardev", f"socket,id=ch0,path={self.socket_path},server=off,reconnect=1",
                     "-device", f"virtserialport,chardev=ch0,name={harness.PORT_NAME}"]
        if self.qemu_balloon:
            balloon = "virtio-balloon-pci,id=balloon0"
            if self.free_page_reporting:
                balloon += ",free-page-reporting=on"
            argv += ["-device", balloon]
        return argv

    def start(self, timeout: float = 60) -> Machine:
        if self.zero_fill:
            _write_zeros(self.ram_file, self.memory_mib << 20)
        t0 = time.monotonic()
        self.popen = subprocess.Popen(self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()
        self.wait_line(r"BALLOON-VM-READY", timeout)
        self.boot_seconds = time.monotonic() - t0
        return self

    def _read_console(self) -> None:
        with open(self.console_log, "ab") as log:
            for raw in iter(self.popen.stdout.readline, b""):
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip("\r\n")
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._lines.append("\0QEMU-EXITED")
            self._cond.notify_all()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def close(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        if self.popen is not None and self.popen.stdin:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        with contextlib.suppress(FileNotFoundError):
            self.ram_file.unlink()
        for path in (self.qmp_path, self.host_qmp_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def __enter__(self) -> Machine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- console ---------------------------------------------------------------------------

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self._lines[-n:])

    def wait_line(self, pattern: str, timeout: float, start: int = 0) -> tuple[int, re.Match]:
        """The first console line from index ``start`` matching ``pattern`` (regex)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self._lines):
                    line = self._lines[index]
                    index += 1
                    if line == "\0QEMU-EXITED":
                        raise GuestError(f"QEMU exited waiting for {pattern!r}:\n{self.tail()}")
                    if (match := rx.search(line)) is not None:
                        return index, match
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"timed out after {timeout}s waiting for {pattern!r}:\n{self.tail()}")
                self._cond.wait(left)

    def run(self, command: str, timeout: float = 60, check: bool = True) -> str:
        """Run one shell command on the console; its output (stdout+stderr)."""
        mark = next(self._marks)
        with self._cond:
            start = len(self._lines)
        # The marker is split in the command so that only its output can match it.
        line = f"{{ {command} ; }} 2>&1; echo \"@@END\"\"{mark}@@ $?\"\n"
        self.popen.stdin.write(line.encode())
        self.popen.stdin.flush()
        end, match = self.wait_line(rf"@@END{mark}@@ (\d+)", timeout, start)
        with self._cond:
            output = "\n".join(self._lines[start:end - 1])
        output += match.string[:match.start()]
        status = int(match.group(1))
        if check and status != 0:
            raise GuestError(f"guest command failed ({status}): {command}\n{output}")
        return output

    def spawn(self, command: str, log: str) -> None:
        """Start ``command`` in the background, output to guest file ``log`` (busybox ash on
        a console without job control exits when a plain ``cmd &`` job ends: subshell it)."""
        self.run(f"( {{ {command} ; }} < /dev/null > {log} 2>&1 & )")

    def python(self, args: str) -> str:
        """``python ARGS`` inside the chroot with this checkout's venv, as a command line."""
        return f"chroot /mnt {GUEST_ENV} {REPO}/.venv/bin/python {args}"

    def agent_command(self, *options: str) -> str:
        return (f"chroot /mnt {GUEST_ENV} {REPO}/.venv/bin/balloon-guest --connect serial:{PORT} "
                f"--id {self.name} --http off " + " ".join(options))

    def pid_of(self, pattern: str) -> list[int]:
        """Guest processes whose command line contains ``pattern`` (busybox pgrep -f does not
        see a Python script's arguments, so read ps)."""
        pids = []
        for line in self.run("ps -o pid,args | cat").splitlines()[1:]:  # a pipe: no 80-column cut
            pid, _, args = line.strip().partition(" ")
            if pattern in args and pid.isdigit() and not args.startswith("ps "):
                pids.append(int(pid))
        return pids

    def meminfo(self) -> dict[str, int]:
        out = self.run("cat /proc/meminfo")
        info = {}
        for line in out.splitlines():
            key, _, rest = line.partition(":")
            if rest.strip():
                info[key.strip()] = int(rest.split()[0]) * 1024
        return info

    # -- host-side views -------------------------------------------------------------------

    def ram_allocated(self) -> int:
        """Bytes of the RAM file backed by host memory (st_blocks; never mmap it)."""
        return os.stat(self.ram_file).st_blocks * 512

    def qmp(self, *commands: dict, timeout: float = 10) -> list[dict]:
        """Run QMP commands (after qmp_capabilities); their "return" values."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.qmp_path))
            stream = sock.makefile("rwb")
            json.loads(stream.readline())  # greeting
            results = []
            for command in ({"execute": "qmp_capabilities"}, *commands):
                stream.write(json.dumps(command).encode() + b"\n")
                stream.flush()
                while True:
                    reply = json.loads(stream.readline())
                    if "return" in reply or "error" in reply:
                        break
                if "error" in reply:
                    raise GuestError(f"QMP {command}: {reply['error']}")
                results.append(reply["return"])
            return results[1:]


def _write_zeros(path: Path, size: int) -> None:
    """Back every page of a new RAM file: tmpfs counts fallocated-but-unwritten pages as holes
    (SEEK_DATA), and QEMU's prealloc=on takes ~15 s for 5 GiB under TCG; writing is ~2x faster."""
    chunk = bytes(64 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(bytes(size % len(chunk)))


def short_folder(prefix: str = "bvm-") -> Path:
    """A short temp folder (AF_UNIX paths are limited to 108 bytes); RAM files live in /dev/shm."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


if __name__ == "__main__":  # boot a guest and give its console to the terminal (debugging)
    artifacts = harness.ensure()
    folder = short_folder()
    with Machine(artifacts, folder) as vm:
        print(f"booted in {vm.boot_seconds:.1f}s; console log {vm.console_log}", file=sys.stderr)
        print(vm.run("uname -r; free -m; ls -l /dev/virtio-ports/ ; ls /mnt/work"))
        print(vm.run(vm.python("-c 'import numpy, msgpack, sys; print(sys.version, numpy.__version__)'"), 120))
