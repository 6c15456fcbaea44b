"""What a real-VM test needs on this machine kind, installed and cached once.

The recipe is docs/OPERATIONS.md "Real VMs":

* QEMU and a static busybox from Debian (``apt-get install qemu-system-x86 busybox-static``);
* Debian's own kernel, never installed: ``apt-get download`` of the current
  ``linux-image-*-amd64``, ``dpkg-deb -x``, and from it only
  - an uncompressed ``vmlinux`` (the XZ stream inside the bzImage, unpacked with Python's
    lzma), which QEMU boots through its PVH entry in ~2 s under TCG instead of ~5 s;
  - the few modules a guest needs (virtio-pci, virtio-console, 9p over virtio,
    virtio-balloon for QEMU's own balloon), with their dependencies resolved from each
    module's ``.modinfo`` ``depends=`` (there is no depmod/kmod here);
* an initramfs (newc cpio, written here) with busybox, those modules and ``/init``.

Everything lands in ``$BALLOON_VM_CACHE`` (default ``/var/cache/balloon-vm``), one folder per
kernel package, so a second run finds it in milliseconds. :func:`missing` says why a VM
cannot run here (for pytest's skip reason); :func:`ensure` installs what is missing.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("BALLOON_VM_CACHE", "/var/cache/balloon-vm"))
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
APT_PACKAGES = ("qemu-system-x86", "busybox-static")
#: The modules a guest loads (more come in as their dependencies).
MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "virtio_balloon")
XZ_MAGIC = b"\xfd7zXZ\x00"
PORT_NAME = "org.balloon.0"

INIT = r"""#!/bin/busybox sh
# balloon-hints VM init: mount, load modules, make udev's virtio-ports links, share the host.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "init: insmod $m failed"; done
i=0
while grep -q balloon.port /proc/cmdline && [ $i -lt 250 ] && ! ls /sys/class/virtio-ports/*/name >/dev/null 2>&1; do
  usleep 20000; i=$((i+1))
done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
done
ip link set lo up 2>/dev/null
if grep -q 'balloon.hostroot' /proc/cmdline; then
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /mnt &&
  mount -t proc proc /mnt/proc && mount -t sysfs sys /mnt/sys && mount -t devtmpfs dev /mnt/dev &&
  mkdir -p /hosttmp && mount -o bind /mnt/tmp /hosttmp &&
  mount -t tmpfs -o size=256m tmp /mnt/tmp || echo "init: 9p share failed"
  # The writable /tmp hides the host's: keep visible the host folders under /tmp that the
  # guest needs (a checkout cloned under /tmp, as CI may do), bound back in read-only.
  for d in $(tr ' ' '\n' < /proc/cmdline | sed -n 's/^balloon.tmpkeep=//p' | tr ',' ' '); do
    mkdir -p "/mnt/tmp/$d" && mount -o bind "/hosttmp/$d" "/mnt/tmp/$d" || echo "init: cannot keep /tmp/$d"
  done
fi
stty -echo -onlcr 2>/dev/null
export PS1=
echo "BALLOON-VM-READY $(cut -d' ' -f1 /proc/uptime)"
# PID 1 must never exit (the kernel panics): ash without job control on a console sometimes
# ends when a background job dies, so the shell is restarted.
while true; do sh; echo "init: shell exited, restarting"; done
"""


@dataclass(frozen=True)
class Artifacts:
    directory: Path
    vmlinux: Path
    initramfs: Path
    kernel_package: str
    kernel_release: str

    @classmethod
    def load(cls, directory: Path) -> Artifacts | None:
        """The cached kernel of ``directory``, with an initramfs for the current /init."""
        try:
            meta = json.loads((directory / "READY").read_text())
        except (OSError, ValueError):
            return None
        vmlinux, modules = directory / "vmlinux", directory / "modules"
        order = modules / "modules.order"
        if not (vmlinux.is_file() and order.is_file()):
            return None
        stamp = hashlib.sha256(INIT.encode() + order.read_bytes() + BUSYBOX.read_bytes()).hexdigest()[:12]
        initramfs = directory / f"initramfs-{stamp}.cpio"
        if not initramfs.is_file():  # /init changed: rebuild from the cached modules (ms)
            for old in directory.glob("initramfs-*.cpio"):
                old.unlink()
            paths = [modules / name for name in order.read_text().split()]
            build_initramfs(directory / ".initramfs.tmp", paths)
            (directory / ".initramfs.tmp").rename(initramfs)
        return cls(directory, vmlinux, initramfs, meta["package"], meta["release"])


def _is_static(path: Path) -> bool:
    """An ELF without a program interpreter (busybox-static, not Debian's dynamic busybox)."""
    try:
        head = path.read_bytes()[:8192]
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and b"/ld-linux" not in head


def _run(argv, cwd=None, timeout=300) -> str:
    done = subprocess.run(argv, cwd=cwd, timeout=timeout, capture_output=True, text=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    return done.stdout


def tools_missing() -> list[str]:
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(QEMU)
    if not _is_static(BUSYBOX):
        missing.append("a static /bin/busybox (busybox-static)")
    return missing


def can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


def kernel_package() -> str:
    """The current ``linux-image-<abi>-amd64`` (Debian bumps the ABI number)."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"], timeout=60)
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "Depends:" and parts[1].startswith("linux-image-"):
            return parts[1]
    raise RuntimeError("apt-cache depends linux-image-amd64 names no linux-image package")


def cached() -> Artifacts | None:
    """The newest cached kernel + initramfs, without asking apt."""
    if not CACHE.is_dir():
        return None
    found = [a for d in sorted(CACHE.iterdir()) if (a := Artifacts.load(d)) is not None]
    return found[-1] if found else None


def missing() -> str | None:
    """Why no VM can run here (None when everything is there or can be installed)."""
    if not Path("/proc/self").exists() or os.uname().machine != "x86_64":
        return "real-VM tests need an x86_64 Linux host"
    if (tools_missing() or cached() is None) and not can_install():
        what = ", ".join(tools_missing()) or f"the guest kernel cache {CACHE}"
        return f"missing {what}, and installing needs root with apt-get (run `make vm-test` as root)"
    return None


def ensure(log=print) -> Artifacts:
    """Install QEMU/busybox if needed and build (or find) the cached kernel + initramfs."""
    if tools_missing():
        if not can_install():
            raise RuntimeError(f"missing {', '.join(tools_missing())} and cannot apt-get install as non-root")
        t0 = time.monotonic()
        try:
            _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES])
        except RuntimeError:
            _run(["apt-get", "update", "-qq"])
            _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES])
        log(f"vm: installed {' '.join(APT_PACKAGES)} in {time.monotonic() - t0:.1f}s")
    try:
        package = kernel_package()
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        found = cached()
        if found is not None:
            return found
        raise
    directory = CACHE / package
    found = Artifacts.load(directory)
    if found is not None:
        return found
    if not can_install():
        raise RuntimeError(f"no cached guest kernel in {directory} and cannot apt-get download as non-root")
    return _build(package, directory, log)


def _build(package: str, directory: Path, log) -> Artifacts:
    t0 = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".build-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", "-q", package], cwd=work)
        deb = next(work.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        deb.unlink()
        vmlinuz = next((work / "root" / "boot").glob("vmlinuz-*"))
        release = vmlinuz.name[len("vmlinuz-"):]
        staging = work / "out"
        staging.mkdir()
        (staging / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        modules = resolve_modules(work / "root" / "lib" / "modules" / release / "kernel", MODULES)
        (staging / "modules").mkdir()
        for path in modules:
            shutil.copyfile(path, staging / "modules" / path.name)
        (staging / "modules" / "modules.order").write_text("".join(p.name + "\n" for p in modules))
        (staging / "READY").write_text(json.dumps({
            "package": package, "release": release, "modules": [m.name for m in modules],
            "built_seconds": round(time.monotonic() - t0, 1)}))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    log(f"vm: guest kernel {release} and initramfs cached in {directory} ({time.monotonic() - t0:.1f}s)")
    found = Artifacts.load(directory)
    assert found is not None
    return found


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed kernel ELF inside a bzImage (Debian compresses it with XZ)."""
    start = bzimage.find(XZ_MAGIC)
    if start < 0:
        raise RuntimeError("no XZ stream in the bzImage (not an XZ-compressed kernel)")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elf = decompressor.decompress(bzimage[start:])  # stops at the end of the stream
    if elf[:4] != b"\x7fELF":
        raise RuntimeError("the bzImage's XZ stream is not an ELF kernel")
    return elf


def modinfo(path: Path) -> dict[str, str]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise RuntimeError(f"{path}: not an ELF64 module (compressed modules are not supported)")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.index(b"\x00", names_at + name)
        if data[names_at + name:end] == b".modinfo":
            info = {}
            for item in data[offset:offset + size].split(b"\x00"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    return {}


def resolve_modules(tree: Path, wanted) -> list[Path]:
    """The ``.ko`` files for ``wanted`` and their dependencies, dependencies first."""
    index = {p.name[:-3].replace("-", "_"): p for p in tree.rglob("*.ko")}
    ordered: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name in chain:
            raise RuntimeError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        path = index.get(name)
        if path is None:
            raise RuntimeError(f"module {name} not found under {tree} (built in? then drop it from MODULES)")
        for dep in filter(None, modinfo(path).get("depends", "").split(",")):
            visit(dep, chain + (name,))
        seen.add(name)
        ordered.append(path)

    for name in wanted:
        visit(name, ())
    return ordered


def _cpio_entry(out, name: str, mode: int, data: bytes = b"", ino: int = 0) -> None:
    """One "newc" record (070701), as the kernel's initramfs unpacker reads it."""
    encoded = name.encode() + b"\x00"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
    out.write(b"\x00" * (-(110 + len(encoded)) % 4))
    out.write(data)
    out.write(b"\x00" * (-len(data) % 4))


def build_initramfs(target: Path, modules: list[Path]) -> None:
    entries = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "root", "lib", "lib/modules")]
    entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes()))
    entries.append(("init", 0o100755, INIT.encode()))
    for path in modules:
        entries.append((f"lib/modules/{path.name}", 0o100644, path.read_bytes()))
    entries.append(("modules.order", 0o100644, "".join(p.name + "\n" for p in modules).encode()))
    with open(target, "wb") as out:
        for ino, (name, mode, data) in enumerate(entries, start=1):
            _cpio_entry(out, name, mode, data, ino)
        _cpio_entry(out, "TRAILER!!!", 0)


def kvm_usable() -> bool:
    """KVM only where a stock kernel can run on it: real VT-x/AMD-V, not KVM-PVM."""
    if os.environ.get("BALLOON_VM_ACCEL"):
        return os.environ["BALLOON_VM_ACCEL"] == "kvm"
    if not os.path.exists("/dev/kvm") or os.path.isdir("/sys/module/kvm_pvm"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags


if __name__ == "__main__":  # make vm-deps
    artifacts = ensure()
    print(f"vm-deps: QEMU and busybox installed; guest kernel {artifacts.kernel_release} "
          f"cached in {artifacts.directory}")
