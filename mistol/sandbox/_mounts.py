"""The code's own view of the filesystem, built in a private mount namespace.

Standard library only: the worker imports it before the code runs. `private_root` makes a new,
empty root (a small tmpfs) and puts into it only:

- read-only: /usr, /bin, /sbin, /lib*, the interpreter's prefixes and the directories on its
  import path (a venv, a pyenv under /root: bound at the same path, so no right to read
  everything is needed), and a short list of harmless files from /etc (the dynamic linker's
  cache, time zone, TLS certificates; a passwd and group that name only root, nobody and the
  sandbox's user);
- /dev with null, zero, full, random, urandom and tty-free links to /proc/self/fd;
- /proc of the sandbox's own PID namespace (its processes only);
- writable: the working directory, /tmp, /var/tmp and /dev/shm, all on one tmpfs of
  `disk_mb` MB (past it writes fail with ENOSPC), which the kernel frees when the sandbox's
  last process ends.

Nothing else exists there: no /home, /root, /run, /mnt, /media, /srv, /sys, /var (but
/var/tmp), no other file of /etc, no host unix socket. The old root is unmounted, so it
cannot be reached by any path.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
SYS_MOUNT_SETATTR = 442  # the same on every architecture
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

SYSTEM = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
ETC = ["ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "ssl", "ca-certificates",
       "ca-certificates.conf", "pki", "alternatives", "nsswitch.conf", "hosts", "host.conf", "protocols",
       "services", "mime.types", "os-release", "debian_version", "fonts", "gai.conf", "matplotlibrc"]
DEVICES = ["null", "zero", "full", "random", "urandom"]
SCRATCH = {"/tmp": "tmp", "/var/tmp": "var-tmp", "/dev/shm": "shm"}  # writable, besides the working directory

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def available() -> bool:
    """Whether this architecture's pivot_root is known here (the namespaces are probed elsewhere)."""
    return platform.machine() in SYS_PIVOT_ROOT


def interpreter_paths() -> list[str]:
    """What Python needs to run and import: its prefixes and its import path, real paths, no overlaps."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *sys.path]
    real = {os.path.realpath(p) for p in paths if p and os.path.isabs(p) and os.path.exists(p)} - {"/"}
    kept: list[str] = []
    for path in sorted(real):  # a parent sorts before its children
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def private_root(workdir: str, disk_mb: int, owner: tuple[int, int], mount_proc: bool) -> list[str]:
    """Build the sandbox's root and move into it (see the module's docstring); cwd is `workdir`.

    Must run in a fresh mount namespace with CAP_SYS_ADMIN there (root, or the creator of the
    user namespace), before privileges are dropped. Returns the paths the code can read.
    `workdir` (an existing, empty host directory) is the mount point of the new root while it
    is built, and the path of the private working directory inside it.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host's mounts
    new = workdir
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    readable = []
    python = [p for p in interpreter_paths() if not _under(p, SYSTEM)]
    in_scratch = [p for p in python if _under(p, list(SCRATCH))]  # a venv in /tmp, say
    for path in SYSTEM + [p for p in python if p not in in_scratch]:
        if _copy(path, new):
            readable.append(path)
    os.makedirs(new + "/etc", mode=0o755)
    for name in ETC:
        _copy("/etc/" + name, new)
    _write(new + "/etc/passwd", _passwd(owner, workdir))
    _write(new + "/etc/group", "root:x:0:\nnogroup:x:65534:\n" + (f"sandbox:x:{owner[1]}:\n" if owner[1] not in (0, 65534) else ""))
    os.makedirs(new + "/dev", mode=0o755)
    for name in DEVICES:
        _write(new + "/dev/" + name, "")
        _mount("/dev/" + name, new + "/dev/" + name, None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, new + "/dev/" + name)
    _scratch(new, workdir, disk_mb, owner)
    for path in in_scratch:  # on top of the private /tmp, which would hide them
        if _copy(path, new):
            readable.append(path)
    os.makedirs(new + "/proc", mode=0o555)
    if mount_proc:  # before the old root goes: the kernel wants a full /proc in view to allow a new one
        _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(new)  # no process of the namespace may keep a directory of the old root
    os.makedirs(".old-root")
    _check(_libc.syscall(SYS_PIVOT_ROOT[platform.machine()], b".", b".old-root"))
    os.chdir("/")
    _check(_libc.umount2(b"/.old-root", MNT_DETACH))
    os.rmdir("/.old-root")
    _readonly("/", recursive=False)
    os.chdir(workdir)
    return readable + ["/etc (" + ", ".join(n for n in ETC if os.path.lexists("/etc/" + n)) + ", passwd, group)"]


def _scratch(new: str, workdir: str, disk_mb: int, owner: tuple[int, int]) -> None:
    """One tmpfs of `disk_mb` MB for every place the code may write."""
    scratch = new + "/.scratch"
    os.makedirs(scratch)
    inodes = max(4096, disk_mb * 64)  # empty files cost kernel memory that `size` does not count
    _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,nr_inodes={inodes},mode=0755")
    for inside, name in SCRATCH.items():
        os.mkdir(f"{scratch}/{name}")
        os.chmod(f"{scratch}/{name}", 0o1777)
        os.makedirs(new + inside, exist_ok=True)
        _mount(f"{scratch}/{name}", new + inside, None, MS_BIND)
    os.mkdir(scratch + "/work", 0o700)
    os.chown(scratch + "/work", *owner)
    os.makedirs(new + workdir, exist_ok=True)  # under /tmp it is made on the scratch tmpfs itself
    _mount(scratch + "/work", new + workdir, None, MS_BIND)
    _check(_libc.umount2(scratch.encode(), MNT_DETACH))
    os.rmdir(scratch)


def _copy(path: str, new: str) -> bool:
    """Put host `path` at the same place in `new`: a symlink as a symlink, else a read-only bind."""
    if not os.path.lexists(path):
        return False
    target = new + path
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
        return True
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        _write(target, "")
    _mount(path, target, None, MS_BIND | MS_REC)
    _readonly(target, recursive=True)
    return True


def _readonly(path: str, recursive: bool) -> None:
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    flags = AT_RECURSIVE if recursive else 0
    if _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        return
    if ctypes.get_errno() != 38:  # ENOSYS: a kernel older than 5.12, remount below
        _check(-1)
    st = os.statvfs(path)  # a remount must repeat the flags the kernel locked
    locked = st.f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048 | 1 << 21)  # + noatime, nodiratime, relatime
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | locked)


def _passwd(owner: tuple[int, int], workdir: str) -> str:
    lines = ["root:x:0:0:root:/nonexistent:/usr/sbin/nologin", "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"]
    if owner[0] not in (0, 65534):
        lines.append(f"sandbox:x:{owner[0]}:{owner[1]}:sandbox:{workdir}:/bin/sh")
    return "\n".join(lines) + "\n"


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source or ''} on {target}: {os.strerror(err)}")


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
