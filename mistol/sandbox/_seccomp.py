"""A seccomp filter for the code: the few system calls that reach past the sandbox's files.

Standard library only: the worker imports it before the code runs. The namespaces and
Landlock decide what the code sees of files, the network and processes; these calls reach
kernel objects that neither covers:

- keyrings (`add_key`, `request_key`, `keyctl`): a user's keyring is shared by every process
  of that uid on the machine (as root the code runs as `nobody`), and the session keyring
  comes from whoever started mistol, with its secrets;
- SysV IPC (shared memory, semaphores, message queues) and POSIX message queues: kernel
  memory that outlives the process and counts against no limit of ours;
- `memfd_create`, `memfd_secret`: anonymous files in memory that neither the address-space
  limit nor the disk cap sees.

Each answers EPERM, as if the kernel refused; a system call of another ABI than the
machine's own (i386 or x32 on x86-64) answers EPERM too, so the numbers cannot be dodged.
Other architectures get no filter (`install` returns False).
"""

from __future__ import annotations

import ctypes
import errno
import platform

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
X32_BIT = 0x40000000

# machine -> (AUDIT_ARCH_*, {name: number})
DENIED = {
    "x86_64": (0xC000003E, dict(
        shmget=29, shmat=30, shmctl=31, shmdt=67, semget=64, semop=65, semctl=66, semtimedop=220,
        msgget=68, msgsnd=69, msgrcv=70, msgctl=71, mq_open=240,
        add_key=248, request_key=249, keyctl=250, memfd_create=319, memfd_secret=447)),
    "aarch64": (0xC00000B7, dict(
        shmget=194, shmctl=195, shmat=196, shmdt=197, semget=190, semctl=191, semtimedop=192, semop=193,
        msgget=186, msgctl=187, msgrcv=188, msgsnd=189, mq_open=180,
        add_key=217, request_key=218, keyctl=219, memfd_create=279, memfd_secret=447)),
}


class _Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Instruction))]


def program(arch: int, numbers: list[int], x32: bool) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k): seccomp_data.arch at offset 4, .nr at offset 0."""
    deny = (RET_K, 0, 0, RET_ERRNO | errno.EPERM)
    checks = [(JGE_K, 0, 0, X32_BIT)] if x32 else []
    checks += [(JEQ_K, 0, 0, n) for n in numbers]
    # every check jumps to `deny` (the last instruction) when it holds; past all of them, allow
    body = [(code, len(checks) - i, 0, k) for i, (code, _, _, k) in enumerate(checks)]
    return [(LD_W_ABS, 0, 0, 4), (JEQ_K, 1, 0, arch), deny, (LD_W_ABS, 0, 0, 0), *body,
            (RET_K, 0, 0, RET_ALLOW), deny]


def install() -> bool:
    """Filter this process and all it starts (after PR_SET_NO_NEW_PRIVS); False where there
    is no filter for this machine. Raises OSError if the kernel refuses it."""
    machine = platform.machine()
    if machine not in DENIED:
        return False
    arch, calls = DENIED[machine]
    instructions = program(arch, sorted(calls.values()), x32=machine == "x86_64")
    array = (_Instruction * len(instructions))(*(_Instruction(*i) for i in instructions))
    prog = _Program(len(instructions), array)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {errno.errorcode.get(err, err)}")
    return True


def leave_session_keyring() -> None:
    """Join a new, empty session keyring, so that the code holds none of its starter's keys
    (before `install`, which then forbids keyrings altogether)."""
    calls = DENIED.get(platform.machine(), (0, {}))[1]
    if "keyctl" in calls:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(ctypes.c_long(calls["keyctl"]), ctypes.c_long(1), None)  # KEYCTL_JOIN_SESSION_KEYRING
