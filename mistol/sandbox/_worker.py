"""The process that runs the model's code; started by `sandbox.py`, never imported by mistol.

It is started as a script (`python -I -u -X utf8 _worker.py CONFIG`) so that it imports only
the standard library: no torch, no mistol, a start in tens of milliseconds.

Process tree, when the kernel allows namespaces (it does as root and, on most distributions,
for ordinary users through a user namespace):

    launcher   unshares a network namespace (no network: only its own loopback), a mount
       |       namespace and a PID namespace, then waits for `init` and exits with its status
    init       PID 1 of the new PID namespace: reaps orphans; when it exits the kernel kills
       |       every process left in the namespace, so nothing the code started survives it
    worker     moves into a private root (`_mounts.py`: the interpreter read-only, a private
               working directory and /tmp on a size-capped tmpfs, nothing else), drops root
               (to nobody) or its capabilities, sets the rlimits, locks the files it may use
               with Landlock (`_landlock.py`), then runs the code the parent sends; after each
               block it kills what the code left running in the namespace

Protocol: the parent writes length-prefixed JSON requests ({"code": ..., "id": ...}) on the
`ctl` pipe and reads the answers on the `status` pipe ({"ready": ...} once, then
{"ok": bool, "id": ...} after each run, or {"broken": why}). Those two pipes are held by
`init` (or, with no PID namespace, by the launcher), never by the worker: the code runs in
the worker, and whatever it can reach it can forge. `init` relays the worker's replies over a
pipe of their own and checks each one: at most MAX_REPLY bytes, JSON of the expected shape,
the id of the block it is running. Anything else means the code wrote there: init says
{"broken": why} and ends the sandbox, so a forged reply never shifts one block's output to
the next. init cannot be signalled from inside its namespace and is not dumpable, so the code
can neither kill it nor open its descriptors through /proc.

stdout and stderr of the code are one pipe, read by the parent, so they stay in the order
they were written (the interpreter runs unbuffered, -u).
"""

import ast
import ctypes
import json
import linecache
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
import traceback
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I left out the script's directory
import _landlock  # noqa: E402
import _mounts  # noqa: E402
import _seccomp  # noqa: E402

del sys.path[0]  # the code's imports do not look here

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_NEWIPC = 0x08000000  # SysV IPC objects of its own, gone with the namespace
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_SET_DUMPABLE = 4
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
WORKER_FILE = os.path.abspath(__file__)
MAX_REPLY = 1 << 14  # the worker's replies are under a kilobyte: a longer one is forged
PIPES_LOST = 125  # the worker's exit status when the code closed or replaced its pipes to the relay
READY = object()  # what the relay waits for before the first block: the worker's "ready"

_libc = ctypes.CDLL(None, use_errno=True)
_running = False  # SIGINT interrupts the code, never the worker's own bookkeeping


# -- namespaces ----------------------------------------------------------------------------
def unshare(flags: int) -> None:
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(flags)
    elif _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_namespaces(isolate_network: bool) -> tuple[bool, bool, bool]:
    """Unshare the network (if asked), mount and PID namespaces; returns (network, pid, mount) as done.

    Root may create them directly. Anyone else needs a user namespace first, in which this
    process maps its own uid and gid to themselves, so files it writes stay the user's.
    """
    net = CLONE_NEWNET if isolate_network else 0
    user = CLONE_NEWUSER if os.geteuid() != 0 else 0
    last_error = None
    for flags in (net | CLONE_NEWNS | CLONE_NEWPID, net | CLONE_NEWNS, net | CLONE_NEWPID, net):
        if not flags:
            break
        try:
            try_unshare(flags | user)
        except OSError as e:
            last_error = e
            continue
        if user:
            uid, gid = os.geteuid(), os.getegid()
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"{gid} {gid} 1")
        if net:
            loopback_up()
        return bool(net), bool(flags & CLONE_NEWPID), bool(flags & CLONE_NEWNS)
    if isolate_network:
        raise last_error
    return False, False, False


def try_unshare(flags: int) -> None:
    """unshare(flags), with an IPC namespace of its own where the kernel allows one."""
    try:
        unshare(flags | CLONE_NEWIPC)
    except OSError:
        unshare(flags)


def loopback_up() -> None:
    """A new network namespace has only `lo`, and down: bring it up so local servers work."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    import fcntl

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0)))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
    except OSError:
        pass  # no loopback inside is an inconvenience, not a hole


def probe() -> int:
    """Exit status 0 when network and mount namespaces can be made here (used by the parent)."""
    try:
        unshare(CLONE_NEWNET | CLONE_NEWNS | (CLONE_NEWUSER if os.geteuid() != 0 else 0))
    except OSError:
        return 1
    return 0 if _mounts.available() else 1


def probe_files() -> int:
    """Exit status 0 when the code can get a private root here (a mount namespace).

    Landlock alone is not enough to say yes: it cannot stop a connect() to a host unix socket.
    """
    try:
        unshare(CLONE_NEWNS | (CLONE_NEWUSER if os.geteuid() != 0 else 0))
    except OSError:
        return 1
    return 0 if _mounts.available() else 1


# -- files, privileges and limits -------------------------------------------------------------
def confine_files(cfg: dict, isolation: dict, owner: tuple[int, int]) -> None:
    """Give the code its private root (with a mount namespace) and lock it with Landlock.

    Records in `isolation["filesystem"]` what was done. Raises OSError when the private root
    could not be built: the code must then not run at all.
    """
    workdir = cfg["workdir"]
    done = []
    if isolation.pop("mount_namespace") and _mounts.available():
        _mounts.private_root(workdir, cfg["disk_mb"], owner, mount_proc=isolation["pid_namespace"])
        done.append(f"private root, {cfg['disk_mb']} MB for its files")
        read_only, read_write = ["/"], [workdir, "/tmp", "/var/tmp", "/dev/shm"]
    else:  # the host's files, allowlisted: no private /tmp, no size cap
        etc = ["/etc/" + name for name in _mounts.ETC + ["passwd", "group"]]
        read_only, read_write = _mounts.SYSTEM + _mounts.interpreter_paths() + etc + ["/proc"], [workdir]
        os.chdir(workdir)
    isolation["filesystem"] = ", ".join(done) or "none"
    isolation["landlock"] = (read_only, read_write)  # applied once privileges are dropped


def apply_landlock(isolation: dict) -> None:
    read_only, read_write = isolation.pop("landlock")
    try:
        abi = _landlock.restrict(read_only, read_write, ["/dev/" + name for name in _mounts.DEVICES])
    except OSError as e:
        if isolation["filesystem"] == "none":
            isolation["filesystem"] = f"none (no mount namespace, no Landlock: {e.strerror})"
        return
    what = "Landlock ABI %d" % abi
    isolation["filesystem"] = what if isolation["filesystem"] == "none" else f"{isolation['filesystem']}, {what}"


def drop_root(uid: int) -> str:
    """Run as `uid` (nobody) instead of root; returns a note for the isolation report.

    As root the kernel does not enforce RLIMIT_NPROC, and the code could change any file.
    Switching user clears every capability.
    """
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    return "nobody"


def drop_capabilities() -> None:
    """Give up the capabilities the user namespace granted: the code must not remount or unmount."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if _libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def tasks_of(uid: int) -> int:
    """Processes and threads of `uid` on the system: what RLIMIT_NPROC counts outside a user namespace."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                n += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            pass
    return n


def set_limits(cfg: dict, own_user_namespace: bool) -> int | None:
    """Set the rlimits; returns the RLIMIT_NPROC value when the kernel enforces it."""
    mem = cfg["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    set_cpu_limit(cfg["cpu_s"])
    # In our own user namespace the count is this sandbox's tasks only (launcher and init
    # included); otherwise it is all the tasks of the user, so leave room for those.
    base = 2 if own_user_namespace else tasks_of(os.getuid())
    nproc = base + cfg["max_processes"]
    enforced = nproc_enforced()
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    return nproc if enforced else None


def nproc_enforced() -> bool:
    """Whether the kernel applies RLIMIT_NPROC to us: not to real root, whatever the namespaces say."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (1, hard))  # we are one task already
    try:
        pid = os.fork()
    except BlockingIOError:
        return True
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return False


def set_cpu_limit(cpu_s: int) -> None:
    """RLIMIT_CPU counts the whole life of the process: give each run `cpu_s` more seconds."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(used.ru_utime + used.ru_stime) + cpu_s
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))


# -- messages ------------------------------------------------------------------------------
def send(fd: int, message: dict) -> None:
    data = json.dumps(message).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd: int) -> dict | None:
    def read(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    head = read(4)
    if head is None:
        return None
    body = read(struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body)


# -- running code --------------------------------------------------------------------------
def run_code(code: str, namespace: dict, n: int) -> bool:
    """Run one block like a REPL cell: the value of a last bare expression is printed."""
    global _running
    filename = f"<cell {n}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    _running = True
    try:
        tree = ast.parse(code, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Interactive([tree.body.pop()])
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            exec(compile(last, filename, "single"), namespace)  # sys.displayhook prints it
        return True
    except SystemExit as e:
        _running = False
        if e.code in (None, 0):
            return True
        print(f"SystemExit: {e.code}", file=sys.stderr)
        return False
    except BaseException as e:  # KeyboardInterrupt too: the block ends, the worker goes on
        _running = False
        print_user_traceback(e)
        return False
    finally:
        _running = False


def print_user_traceback(e: BaseException) -> None:
    """The traceback without the worker's own frames, its last 20 frames at most."""
    tb = e.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell "):
        tb = tb.tb_next
    if tb is None:  # a SyntaxError from ast.parse: its message names the line already
        sys.stderr.write("".join(traceback.format_exception_only(type(e), e)))
        return
    report = traceback.TracebackException(type(e), e, tb, compact=True)
    seen, todo = set(), [report]
    while todo:  # the chained exceptions too ("During handling of the above exception ...")
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        frames = [f for f in t.stack if f.filename != WORKER_FILE][-20:]
        t.stack = traceback.StackSummary.from_list(frames)
        todo += [c for c in (t.__cause__, t.__context__) if c is not None]
    sys.stderr.write("".join(report.format()))


def end_other_processes() -> None:
    """Kill what the code left running: a fork bomb, a forgotten server, a busy loop.

    Such processes would otherwise compete with the model for the CPU until the sandbox
    closes. Inside our PID namespace kill(-1) reaches every process of the sandbox except
    PID 1 and this one; outside one it would reach all the user's processes, so it is only
    called there.
    """
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # until none is left, reaped: the next block starts clean
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return
        try:  # our own children are zombies until we reap them; PID 1 reaps the others
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.001)


def on_sigint(signum, frame):
    if _running:
        raise KeyboardInterrupt


def lock_down(cfg: dict, isolation: dict) -> None:
    """Everything between the namespaces and the first block: files, user, capabilities, limits."""
    as_root = os.geteuid() == 0
    drop_to = cfg.get("drop_to") if as_root else None
    owner = (drop_to, drop_to) if drop_to is not None else (os.geteuid(), os.getegid())
    confine_files(cfg, isolation, owner)
    if drop_to is not None:
        try:
            isolation["user"] = drop_root(drop_to)
        except OSError as e:
            isolation["user"] = f"root (could not switch to uid {drop_to}: {e.strerror})"
    drop_capabilities()
    isolation["process_limit"] = set_limits(cfg, own_user_namespace=isolation.pop("user_namespace"))
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid program (sudo, su) gives rights back
    apply_landlock(isolation)
    apply_seccomp(isolation)


def apply_seccomp(isolation: dict) -> None:
    """No keyrings, SysV IPC, message queues or memory files for the code (see _seccomp)."""
    _seccomp.leave_session_keyring()
    try:
        isolation["syscalls"] = "filtered" if _seccomp.install() else "not filtered (no filter for this machine)"
    except OSError as e:
        isolation["syscalls"] = f"not filtered ({e.strerror})"


def serve(cfg: dict, isolation: dict, requests: int, replies: int) -> None:
    """The worker: lock itself down, then run each block `requests` brings and answer on
    `replies` (both to `relay`)."""
    host_pid = int(os.readlink("/proc/self"))  # before /proc becomes the sandbox's own
    try:
        lock_down(cfg, isolation)
    except OSError as e:
        send(replies, {"error": f"the code's private filesystem could not be set up: {e}"})
        os._exit(3)
    signal.signal(signal.SIGINT, on_sigint)
    main = types.ModuleType("__main__")  # the code's globals; `__main__` so pickling finds its functions
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [""]
    sys.path.insert(0, "")  # like a REPL: modules the code writes in its directory import
    me = os.getpid()
    send(replies, {"ready": True, "pid": host_pid, "isolation": isolation})
    n = 0
    while True:
        try:
            request = receive(requests)
        except (OSError, ValueError):  # the code closed or replaced the pipe: nothing left to trust
            os._exit(PIPES_LOST)
        if request is None:
            os._exit(0)
        n += 1
        set_cpu_limit(cfg["cpu_s"])
        ok = run_code(request["code"], main.__dict__, n)
        if os.getpid() != me:
            os._exit(0 if ok else 1)  # a child the code forked came back here: it ends, like a script's
        if isolation["pid_namespace"]:
            end_other_processes()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            send(replies, {"ok": ok, "id": request["id"]})
        except OSError:
            os._exit(PIPES_LOST)


def main() -> None:
    if sys.argv[1:] == ["--probe"]:
        sys.exit(probe())
    if sys.argv[1:] == ["--probe-files"]:
        sys.exit(probe_files())
    cfg = json.loads(sys.argv[1])
    os.chdir("/")  # no process here keeps the host directory it started in (see _mounts.private_root)
    isolation = {}
    try:
        net, pid_ns, mount_ns = enter_namespaces(not cfg["allow_network"])
    except OSError as e:
        send(cfg["status"], {"error": f"unshare: {e.strerror or e}"})
        sys.exit(3)
    isolation = {"network": net, "pid_namespace": pid_ns, "mount_namespace": mount_ns,
                 "user_namespace": (net or pid_ns or mount_ns) and os.geteuid() != 0,
                 "user": "root" if os.geteuid() == 0 else str(os.geteuid())}
    if not pid_ns:  # the launcher itself relays
        start_worker(cfg, isolation, None)
    # unshare(CLONE_NEWPID) applies to children: the next one is PID 1 of the namespace.
    init = os.fork()
    if init:
        os.close(cfg["ctl"])
        os.close(cfg["status"])
        _, st = os.waitpid(init, 0)
        os._exit(shell_status(st))
    start_worker(cfg, isolation, int(os.readlink("/proc/self")))


# -- the relay: the only holder of the parent's pipes ---------------------------------------
class Forged(Exception):
    """Something on the worker's reply pipe that the worker did not send: the code wrote it."""


def start_worker(cfg: dict, isolation: dict, init_pid: int | None) -> None:
    """Fork the worker, which runs the code without the parent's pipes; relay for it until it ends.

    `init_pid` is our host pid when we are PID 1 of the sandbox's namespace (we then reap the
    orphans too), None when there is no PID namespace.
    """
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no /proc/PID/fd of ours for the code to open
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    worker = os.fork()
    if worker == 0:
        for fd in (cfg["ctl"], cfg["status"], requests_w, replies_r):
            os.close(fd)
        _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # the worker is as it was before the fork
        serve(cfg, isolation, requests_r, replies_w)
        os._exit(0)
    os.close(requests_r)
    os.close(replies_w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        relay(cfg["ctl"], cfg["status"], worker, requests_w, replies_r, init_pid)
    except Forged as e:
        send(cfg["status"], {"broken": str(e)})
    except BaseException:  # never a traceback of ours in the code's output
        pass
    # PID 1 exiting ends everything in the namespace; without one, the parent kills the group
    _kill(worker)
    os._exit(0)


def relay(ctl: int, status: int, worker: int, requests: int, replies: int, init_pid: int | None) -> None:
    """Pass the parent's requests to the worker and its checked replies back; exits with the
    worker's status when it ends, raises Forged when the reply pipe carries anything else."""
    reader = ReplyReader(replies)
    expected = READY  # the reply the worker owes: READY first, then the id of the running block, else None
    watched = [ctl, replies]
    while True:
        readable = select.select(watched, [], [], 0.1)[0]
        ended = reap(worker, everyone=init_pid is not None)
        if ended is not None:
            exit_as(ended)
        if replies in readable:
            messages = reader.read()
            if messages is None:  # the worker closed it, or is ending: its status tells
                exit_as(wait_for(worker, 1.0))
            for message in messages:
                send(status, checked(message, expected, init_pid))
                expected = None
        if ctl in readable:
            request = receive(ctl)
            if request is None:  # the parent closed the sandbox
                return
            expected = request["id"]
            send(requests, request)


def checked(message, expected: object, init_pid: int | None) -> dict:
    """The reply as sent on to the parent, if it is the one the worker owes now."""
    if expected is None:
        raise Forged("a reply came while no block was running")
    if expected is READY:
        if isinstance(message, dict) and set(message) == {"error"} and isinstance(message["error"], str):
            return message  # the worker could not lock itself down (before any code ran)
        if (not isinstance(message, dict) or set(message) != {"ready", "pid", "isolation"}
                or message["ready"] is not True or type(message["pid"]) is not int
                or not isinstance(message["isolation"], dict)):
            raise Forged("the first reply is not the worker's")
        return {**message, "init_pid": init_pid}
    if not isinstance(message, dict) or set(message) != {"ok", "id"} or not isinstance(message["ok"], bool):
        raise Forged("a reply of the wrong form")
    if message["id"] != expected:
        raise Forged("a reply for another block")
    return message


class ReplyReader:
    """Length-prefixed JSON from a non-blocking pipe, each message at most MAX_REPLY bytes."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, b""
        os.set_blocking(fd, False)

    def read(self) -> list | None:
        """The messages complete now; None at end of file. Raises Forged on anything malformed."""
        try:
            data = os.read(self.fd, MAX_REPLY + 4)
        except BlockingIOError:
            return []
        if not data:
            return None
        self.buf += data
        messages = []
        while len(self.buf) >= 4:
            size = struct.unpack(">I", self.buf[:4])[0]
            if size > MAX_REPLY:
                raise Forged(f"a reply of {size} bytes")
            if len(self.buf) < 4 + size:
                break
            body, self.buf = self.buf[4:4 + size], self.buf[4 + size:]
            try:
                messages.append(json.loads(body))
            except (ValueError, RecursionError):  # UnicodeDecodeError included; deep nesting
                raise Forged("a reply that is not JSON") from None
        return messages


def reap(worker: int, everyone: bool) -> int | None:
    """Reap ended children (all of them as PID 1: orphans come to us); the worker's wait status if it ended."""
    while True:
        try:
            pid, st = os.waitpid(-1 if everyone else worker, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == 0:
            return None
        if pid == worker:
            return st


def wait_for(worker: int, timeout: float) -> int:
    """The worker's wait status once it ends; Forged when it lives on without its reply pipe."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, st = os.waitpid(worker, os.WNOHANG)
        if pid:
            return st
        time.sleep(0.01)
    raise Forged("the worker closed its reply pipe")


def exit_as(wait_status: int) -> None:
    """End with the worker's status (see `shell_status`)."""
    if os.waitstatus_to_exitcode(wait_status) == PIPES_LOST:
        raise Forged("the code closed or replaced the worker's pipes")
    os._exit(shell_status(wait_status))


def shell_status(wait_status: int) -> int:
    """An exit status as a shell reports it: a signal as 128 + its number."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    main()
