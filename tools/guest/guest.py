"""A small Linux guest for interoperability tests, built from Debian packages.

``build()`` downloads a Debian cloud kernel, busybox-static, open-iscsi, sg3-utils and
e2fsprogs with ``apt-get download``, unpacks them with ``dpkg -x`` and writes a cpio
initramfs holding busybox, iscsiadm/iscsid, the sg_* tools, mke2fs, their shared
libraries (found with ldd) and the SCSI/iSCSI/virtio kernel modules (dependencies read
from each module's .modinfo). The result is cached in a folder keyed by the package
versions, so a rebuild with nothing changed costs a few ``apt-cache`` calls.

``boot()`` starts it under ``qemu-system-x86_64 -accel tcg`` with a shell script of the
caller's: the guest's /init mounts /proc, /sys and /dev, loads the modules, brings up
eth0 (10.0.2.15) when the guest has a NIC, runs the script, prints its markers and powers
off. The only network is ``-netdev user,restrict=on`` with a guestfwd from
10.0.2.100:3260 to a relay (``tools/guest/relay``) that connects to 127.0.0.1:PORT
(given several ports, the k-th is reached at 10.0.2.(100+k):3260).

``build(multipath=True)`` is a second guest, cached beside the first: Debian's generic
kernel instead of the cloud one (the cloud kernel is built without SCSI device handlers,
so it has no scsi_dh_alua), multipath-tools (multipath, multipathd and their checker and
prioritizer plugins) and the dm-mod, dm-multipath, dm-round-robin and scsi_dh_alua
modules. It costs a 70 MB kernel package more, once.

Inside the script, ``step NAME COMMAND...`` runs a command and frames its combined
output between ``@@@BEGIN NAME`` and ``@@@END NAME RC`` lines; ``parse_steps()`` turns
the console text back into ``{name: Step(rc, output)}``. ``ask_host WORDS...`` prints
``@@@HOST WORDS`` and waits: ``boot(..., on_request=f)`` calls ``f(WORDS)`` on the host
and types its answer on the guest's console, so a script can wait for something the host
does mid-run (a snapshot, a revert) without any clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
RELAY = HERE / "relay"
GUEST_PORTAL = "10.0.2.100:3260"
BEGIN = "@@@BEGIN "
END = "@@@END "
HOST = "@@@HOST "

KERNEL_META = "linux-image-cloud-amd64"
#: The multipath guest's kernel: the generic one has CONFIG_SCSI_DH (scsi_dh_alua).
MULTIPATH_KERNEL_META = "linux-image-amd64"
MULTIPATH_PACKAGES = ["multipath-tools"]
MULTIPATH_BINARIES = ["sbin/multipath", "sbin/multipathd"]
#: multipath-tools' checkers and prioritizers, loaded with dlopen (ldd does not see them).
MULTIPATH_PLUGINS = "lib/multipath/*.so"
#: glibc loads this with dlopen for pthread_cancel (multipathd's threads), from the host.
MULTIPATH_HOST_LIBS = ["/lib/x86_64-linux-gnu/libgcc_s.so.1"]
#: Loaded before the iSCSI modules: scsi_dh_alua attaches to a disk as it is found.
MULTIPATH_MODULES = ["scsi_mod", "scsi_dh_alua", "dm_mod", "dm_multipath", "dm_round_robin"]
PACKAGES = [
    "busybox-static",
    "open-iscsi",
    "libopeniscsiusr",
    "libisns0",
    "sg3-utils",
    "libsgutils2-1.46-2",
    "e2fsprogs",
]
# Binaries copied from the unpacked packages (with their libraries).
BINARIES = ["sbin/iscsiadm", "sbin/iscsid", "sbin/mke2fs", "sbin/e2fsck", "sbin/dumpe2fs"]
BINARY_GLOBS = ["usr/bin/sg_*"]
LINKS = {"sbin/mkfs.ext4": "mke2fs", "sbin/fsck.ext4": "e2fsck"}
# Kernel modules to load at boot, in this order after their dependencies.
MODULES = [
    "crc32c_generic",
    "crc32c-intel",
    "libcrc32c",
    "scsi_mod",
    "sd_mod",
    "sg",
    "scsi_transport_iscsi",
    "libiscsi",
    "libiscsi_tcp",
    "iscsi_tcp",
    "virtio_pci",
    "virtio_net",
    "virtio_scsi",
]

INIT = r"""#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /run /tmp /var/lock /run/lock/iscsi /mnt
mount -t tmpfs run /run
for m in $(cat /etc/modules.load); do
  insmod /lib/modules/$m.ko 2>/dev/null
done
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip addr add 10.0.2.15/24 dev eth0
  ip link set eth0 up
  ip route add default via 10.0.2.2
  # A bigger receive buffer: with the default one, about 2 in 5 boots had one 1 MiB
  # O_DIRECT read stall ~5 s (slirp's TCP persist timer after a zero window, it seems).
  echo "4096 4194304 16777216" > /proc/sys/net/ipv4/tcp_rmem
  echo 16777216 > /proc/sys/net/core/rmem_max
fi
. /lib/guest-lib.sh
echo "@@@GUEST-UP $(cut -d' ' -f1 /proc/uptime)"
if [ -f /run.sh ]; then
  . /run.sh
fi
echo "@@@GUEST-DONE $(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
"""

GUEST_LIB = r"""# Helpers for the scripts run in the guest.
step() {
  _name=$1; shift
  _t0=$(cut -d' ' -f1 /proc/uptime)
  echo "@@@BEGIN $_name"
  "$@" 2>&1
  _rc=$?
  echo "@@@END $_name $_rc $_t0 $(cut -d' ' -f1 /proc/uptime)"
  return $_rc
}
# Start iscsid with an initiator name (it kills its process group when it stops).
start_iscsid() {
  mkdir -p /etc/iscsi /var/lib/iscsi /run/lock/iscsi
  echo "InitiatorName=$1" > /etc/iscsi/initiatorname.iscsi
  : > /etc/iscsi/iscsid.conf
  setsid iscsid -f </dev/null >/tmp/iscsid.log 2>&1 &
  _i=0
  while [ $_i -lt 50 ]; do
    iscsiadm -m session >/dev/null 2>&1
    [ $? -ne 20 ] && return 0   # 20: cannot connect to iscsid
    sleep 0.2; _i=$((_i+1))
  done
  return 1
}
# Ask the host (boot's on_request) for WORDS and wait for its one-line answer on the
# console: 0 when it starts with "ok", 1 otherwise (the answer is printed).
ask_host() {
  stty -echo 2>/dev/null
  echo "@@@HOST $*"
  while read -r _answer; do
    case "$_answer" in
      ok*) return 0 ;;
      fail*) echo "host: $_answer"; return 1 ;;
    esac
  done
  return 1
}
# Print "TARGETNAME LUN sdX sgN" for every SCSI disk of an iSCSI session.
iscsi_disks() {
  for b in /sys/block/sd*; do
    [ -e "$b" ] || continue
    d=$(readlink -f $b/device)
    s=$(echo "$d" | sed -n 's,.*/\(session[0-9]*\)/.*,\1,p')
    [ -n "$s" ] || continue
    lun=${d##*:}
    sg=$(ls $b/device/scsi_generic 2>/dev/null)
    echo "$(cat /sys/class/iscsi_session/$s/targetname) $lun ${b##*/} $sg"
  done
}
# No udevd runs here: give every SCSI disk the udev database entry libudev reads to call
# a device initialized (multipath lists only initialized ones), with the properties
# udev's rules would give it from the NAA (the kernel shows it as wwid): ID_SERIAL, the
# WWID multipath takes, and SCSI_IDENT_LUN_NAA_REGEXT (multipath skips a disk with
# neither SCSI_IDENT_* nor ID_WWN as one udev could not identify).
udev_db_disks() {
  mkdir -p /run/udev/data
  for b in /sys/block/sd*; do
    [ -e "$b/dev" ] || continue
    _f=/run/udev/data/b$(cat $b/dev)
    echo "I:1" > $_f
    _w=$(cat $b/device/wwid 2>/dev/null)
    case "$_w" in naa.*)
      printf 'E:ID_SERIAL=3%s\nE:SCSI_IDENT_LUN_NAA_REGEXT=%s\n' ${_w#naa.} ${_w#naa.} >> $_f ;;
    esac
  done
}
# Wait until N iSCSI disks are there (at most ~30 s).
wait_disks() {
  _i=0
  while [ $_i -lt 150 ]; do
    [ "$(iscsi_disks | wc -l)" -ge "$1" ] && return 0
    sleep 0.2; _i=$((_i+1))
  done
  return 1
}
"""


@dataclasses.dataclass
class Step:
    rc: int
    output: str
    seconds: float = 0.0  # guest uptime from start to end of the step


@dataclasses.dataclass
class GuestRun:
    console: str
    steps: dict[str, Step]
    returncode: int
    seconds: float

    def __getitem__(self, name: str) -> Step:
        if name not in self.steps:
            raise KeyError(f"guest step {name!r} did not run; console:\n{self.console}")
        return self.steps[name]


def cache_root() -> Path:
    if os.environ.get("ISCSI_VMTARGET_GUEST_CACHE"):
        return Path(os.environ["ISCSI_VMTARGET_GUEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iscsi-vmtarget-guest"


def _run(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(
        args, cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def _candidates(pkgs: list[str]) -> dict[str, str | None]:
    out = _run("apt-cache", "policy", *pkgs)
    found: dict[str, str | None] = dict.fromkeys(pkgs)
    name = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            name = line[:-1]
        m = re.match(r"\s+Candidate:\s*(\S+)", line)
        if m and name in found and m.group(1) != "(none)":
            found[name] = m.group(1)
    return found


def _kernel_package(meta: str) -> str:
    out = _run("apt-cache", "depends", meta)
    m = re.search(r"Depends:\s*(linux-image-\S+)", out)
    if not m:
        raise RuntimeError(f"cannot resolve {meta}: {out}")
    return m.group(1)


def _resolve(multipath: bool = False) -> dict[str, str]:
    """Package name -> candidate version for everything the guest is made of."""
    meta = MULTIPATH_KERNEL_META if multipath else KERNEL_META
    extra = MULTIPATH_PACKAGES if multipath else []
    for attempt in range(2):
        try:
            pkgs = [_kernel_package(meta), *PACKAGES, *extra]
            versions = _candidates(pkgs)
            if all(versions.values()):
                return versions  # type: ignore[return-value]
        except (subprocess.CalledProcessError, RuntimeError):
            if attempt:
                raise
        _run("apt-get", "update", "-qq")
    raise RuntimeError(f"apt has no candidate for some of {versions}")


def _host_has(pkg: str) -> bool:
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
    )
    return "install ok installed" in r.stdout


def _download(pkgs: list[str], dest: Path) -> list[Path]:
    """apt-get download PKGS and the library packages they need that the host lacks."""
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o777)  # apt's _apt user writes here
    seen: set[str] = set()
    todo = list(pkgs)
    debs: list[Path] = []
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        seen.add(pkg)
        before = set(dest.glob("*.deb"))
        _run("apt-get", "download", "-q", pkg, cwd=dest)
        new = sorted(set(dest.glob("*.deb")) - before) or sorted(
            dest.glob(f"{pkg}_*.deb")
        )
        debs += new
        for deb in new:
            fields = _run("dpkg-deb", "-f", str(deb), "Depends", "Pre-Depends")
            for dep in re.split(r"[,\n]", fields):
                name = dep.split(":", 1)[-1] if ":" in dep.split("(")[0] else dep
                name = name.split("|")[0].split("(")[0].strip()
                if name.startswith("lib") and name not in seen and not _host_has(name):
                    todo.append(name)
    return debs


def _modinfo_depends(ko: Path) -> list[str]:
    """The ``depends=`` list from a kernel module's .modinfo ELF section."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise RuntimeError(f"{ko}: not an ELF64 module")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _n, stroff, _s = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            for item in data[off:off + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
            return []
    return []


def _module_order(moddir: Path, modules: list[str]) -> list[Path]:
    """The .ko files for MODULES and their dependencies, dependencies first."""
    index: dict[str, Path] = {}
    for ko in moddir.rglob("*.ko"):
        index[ko.stem.replace("-", "_")] = ko
    builtin = {
        Path(line).stem.replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().split()
    }
    order: list[Path] = []

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in builtin:
            return
        ko = index.get(key)
        if ko is None:
            raise RuntimeError(f"kernel module {name} not found")
        if ko in order:
            return
        for dep in _modinfo_depends(ko):
            visit(dep)
        order.append(ko)

    for m in modules:
        key = m.replace("-", "_")
        if key in index or key in builtin:
            visit(m)
    return order


class Cpio:
    """A newc cpio archive written without touching the host's file system."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1000
        self.names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/")
        if name in self.names:
            return
        self.names.add(name)
        self.ino += 1
        fields = [
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0,
        ]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + name.encode() + b"\0")
        self.buf.write(b"\0" * (-(len(hdr) + len(name) + 1) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        if name.strip("/") in ("", "."):
            return
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.names.discard("TRAILER!!!")
        return self.buf.getvalue() + b"\0" * (-self.buf.tell() % 512)


def _libraries(binaries: list[Path], libdirs: list[Path]) -> set[Path]:
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(str(d) for d in libdirs)}
    libs: set[Path] = set()
    for b in binaries:
        r = subprocess.run(["ldd", str(b)], capture_output=True, text=True, env=env)
        if "not a dynamic executable" in r.stdout + r.stderr:
            continue
        for line in r.stdout.splitlines():
            if "not found" in line:
                raise RuntimeError(f"{b}: {line.strip()}")
            m = re.search(r"(/\S+)\s+\(0x", line)
            if m:
                libs.add(Path(m.group(1)))
    return libs


def build(verbose: bool = False, multipath: bool = False) -> Path:
    """Build (or find in the cache) the guest; return its folder (vmlinuz, initrd.cpio).
    MULTIPATH: the multipath guest (see the module docstring)."""
    versions = _resolve(multipath)
    flavour = "multipath" if multipath else "plain"
    key_src = json.dumps(
        {"v": versions, "src": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out = cache_root() / key
    if (out / "manifest.json").exists():
        return out
    t0 = time.monotonic()
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        work = Path(tmp)
        debs = _download(list(versions), work / "debs")
        root = work / "root"
        for deb in debs:
            _run("dpkg-deb", "-x", str(deb), str(root))
        kernel_pkg = next(p for p in versions if p.startswith("linux-image-"))
        kver = kernel_pkg.removeprefix("linux-image-")
        moddir = root / "lib/modules" / kver
        cpio = Cpio()
        for d in ["dev", "proc", "sys", "run", "tmp", "mnt", "etc/iscsi", "var/lib/iscsi",
                  "root", "usr/bin", "usr/sbin", "sbin", "bin"]:
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3)
        binaries = [root / b for b in BINARIES + (MULTIPATH_BINARIES if multipath else [])]
        for pattern in BINARY_GLOBS + ([MULTIPATH_PLUGINS] if multipath else []):
            binaries += sorted(root.glob(pattern))
        libdirs = [root / "lib/x86_64-linux-gnu", root / "usr/lib/x86_64-linux-gnu", root / "lib"]
        libs = _libraries(binaries, libdirs)
        if multipath:
            libs |= {Path(lib) for lib in MULTIPATH_HOST_LIBS}
        for b in binaries:
            cpio.file(str(b.relative_to(root)), b.read_bytes(), 0o755)
        for link, target in LINKS.items():
            cpio.symlink(link, target)
        for lib in sorted(libs):
            guest_path = lib.relative_to(root) if lib.is_relative_to(root) else lib
            cpio.file(str(guest_path).lstrip("/"), lib.resolve().read_bytes(), 0o755)
        # busybox last: the real binaries above win over its applets of the same name
        busybox = root / "bin/busybox"
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in _run(str(busybox), "--list-full").split():
            cpio.symlink(applet, "/bin/busybox")
        for d in libdirs:
            cpio.dir(str(d.relative_to(root)))
        order = _module_order(moddir, (MULTIPATH_MODULES if multipath else []) + MODULES)
        for ko in order:
            cpio.file(f"lib/modules/{ko.stem}.ko", ko.read_bytes())
        cpio.file("etc/modules.load", "".join(f"{ko.stem}\n" for ko in order).encode())
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        cpio.file("init", INIT.encode(), 0o755)
        cpio.file("lib/guest-lib.sh", GUEST_LIB.encode())
        staged = work / "out"
        staged.mkdir()
        (staged / "initrd.cpio").write_bytes(cpio.finish())
        shutil.copy(root / "boot" / f"vmlinuz-{kver}", staged / "vmlinuz")
        manifest = {
            "flavour": flavour,
            "packages": versions,
            "kernel": kver,
            "modules": [ko.stem for ko in order],
            "libraries": sorted(str(x) for x in libs),
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    for old in cache_root().iterdir():  # older builds of this flavour
        if old != out and _flavour(old) == flavour:
            shutil.rmtree(old, ignore_errors=True)
    if verbose:
        print(f"built {out} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return out


def _flavour(build_dir: Path) -> str | None:
    try:
        manifest = json.loads((build_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return str(manifest.get("flavour", "plain"))


def script_cpio(script: str, files: dict[str, bytes] | None = None) -> bytes:
    """A second initramfs archive with /run.sh (and more files), appended to the base."""
    cpio = Cpio()
    cpio.file("run.sh", script.encode(), 0o755)
    for name, data in (files or {}).items():
        cpio.file(name, data)
    return cpio.finish()


def guest_portal(k: int) -> str:
    """The guest's address of the k-th target port given to :func:`qemu_command`."""
    return GUEST_PORTAL if k == 0 else f"10.0.2.{100 + k}:3260"


def qemu_command(
    guest_dir: Path,
    initrd: Path,
    *,
    port: int | list[int] | None = None,
    extra: list[str] | None = None,
    memory: str = "512M",
) -> list[str]:
    """The qemu command line; PORT: the target's port on 127.0.0.1, reached by the guest
    at GUEST_PORTAL, or a list of ports reached at guest_portal(k) for the k-th."""
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", memory, "-smp", "1",
        "-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", str(guest_dir / "vmlinuz"), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 loglevel=1 rdinit=/init",
    ]
    if port is not None:
        forwards = []
        for k, p in enumerate([port] if isinstance(port, int) else port):
            relay = f"{sys.executable} {RELAY} 127.0.0.1 {p}"
            if os.environ.get("ISCSI_VMTARGET_RELAY_TRACE"):
                relay += " " + os.environ["ISCSI_VMTARGET_RELAY_TRACE"]
            if "," in relay:
                raise RuntimeError(f"relay command may not contain commas: {relay}")
            forwards.append(f"guestfwd=tcp:{guest_portal(k)}-cmd:{relay}")
        cmd += [
            "-netdev", f"user,id=n0,restrict=on,{','.join(forwards)}",
            "-device", "virtio-net-pci,netdev=n0,romfile=",
        ]
    return cmd + (extra or [])


def parse_steps(console: str) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    name: str | None = None
    lines: list[str] = []
    for raw in console.splitlines():
        line = raw.rstrip("\r")
        if line.startswith(BEGIN):
            name, lines = line[len(BEGIN):].strip(), []
        elif line.startswith(END) and name is not None:
            # @@@END NAME RC START_UPTIME END_UPTIME
            words = line[len(END):].split()
            rc = int(words[1]) if len(words) > 1 and words[1].lstrip("-").isdigit() else -1
            try:
                seconds = float(words[3]) - float(words[2])
            except (IndexError, ValueError):
                seconds = 0.0
            steps[name] = Step(rc, "\n".join(lines), round(seconds, 2))
            name = None
        elif name is not None:
            lines.append(line)
    if name is not None:  # the guest died inside a step
        steps[name] = Step(-1, "\n".join(lines))
    return steps


def _run_qemu(cmd: list[str], timeout: float) -> tuple[str, int]:
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace"), r.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        return out.decode(errors="replace") + f"\n[qemu killed after {timeout} s]\n", -9


def _converse(
    cmd: list[str], timeout: float, on_request: Callable[[str], str], live: Path | None = None
) -> tuple[str, int]:
    """Run qemu with the console on a pipe both ways: every ``@@@HOST WORDS`` line the
    guest prints is answered with ``on_request(WORDS)`` (an exception answers ``fail``
    and its traceback is added to the console). LIVE: a file the console is copied to
    as it comes (to see where a guest that never ends is)."""
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    console: list[str] = []

    def pump() -> None:
        with open(live or os.devnull, "w", buffering=1) as copy:
            for raw in stdout:
                line = raw.decode(errors="replace")
                console.append(line)
                copy.write(line)
                words = line.rstrip("\r\n")
                if words.startswith(HOST) and not answer(words[len(HOST):].strip()):
                    return

    def answer(words: str) -> bool:
        try:
            reply = on_request(words)
        except Exception as e:  # the guest must hear about it, or it waits forever
            console.append(f"[host: {words!r} failed]\n{traceback.format_exc()}")
            reply = f"fail {type(e).__name__}"
        try:
            stdin.write(reply.replace("\n", " ").encode() + b"\n")
            stdin.flush()
        except BrokenPipeError:
            return False
        return True

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = -9
        console.append(f"\n[qemu killed after {timeout} s]\n")
    except BaseException:  # pytest-timeout, ^C: no guest left running behind
        proc.kill()
        proc.wait()
        raise
    reader.join(timeout=30)
    stdin.close()
    return "".join(console), rc


def boot(
    script: str,
    *,
    port: int | list[int] | None = None,
    extra: list[str] | None = None,
    timeout: float = 240,
    files: dict[str, bytes] | None = None,
    guest_dir: Path | None = None,
    workdir: Path | None = None,
    on_request: Callable[[str], str] | None = None,
) -> GuestRun:
    """Boot the guest once, run SCRIPT in it and return its console and steps.

    ON_REQUEST answers the script's ``ask_host`` calls (see the module docstring)."""
    guest_dir = guest_dir or build()
    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(workdir or tmp) / "initrd-run.cpio"
        initrd.write_bytes((guest_dir / "initrd.cpio").read_bytes() + script_cpio(script, files))
        cmd = qemu_command(guest_dir, initrd, port=port, extra=extra)
        t0 = time.monotonic()
        if on_request is None:
            console, rc = _run_qemu(cmd, timeout)
        else:
            live = Path(workdir) / "console.log" if workdir is not None else None
            console, rc = _converse(cmd, timeout, on_request, live)
        seconds = time.monotonic() - t0
    if workdir is not None:
        (Path(workdir) / "console.log").write_text(console)
    return GuestRun(console, parse_steps(console), rc, seconds)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    build_cmd = sub.add_parser("build", help="build (or find cached) the guest; print its folder")
    run = sub.add_parser("run", help="boot the guest with a script; print the console")
    for p in (build_cmd, run):
        p.add_argument("--multipath", action="store_true", help="the multipath guest")
    run.add_argument("script", help="shell script run in the guest (- for stdin)")
    run.add_argument(
        "--port", type=int, action="append",
        help="target port on 127.0.0.1 (guest: 10.0.2.100:3260; a second: 10.0.2.101:3260 ...)",
    )
    run.add_argument("--timeout", type=float, default=300)
    run.add_argument("qemu_args", nargs="*", help="more qemu arguments (after --)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(build(verbose=True, multipath=args.multipath))
        return 0
    text = sys.stdin.read() if args.script == "-" else Path(args.script).read_text()
    res = boot(
        text, port=args.port, extra=args.qemu_args, timeout=args.timeout,
        guest_dir=build(multipath=args.multipath),
    )
    sys.stdout.write(res.console)
    print(f"[guest: qemu rc {res.returncode}, {res.seconds:.1f} s]", file=sys.stderr)
    return 0 if res.returncode == 0 else 1
