"""Run the model's Python code in a separate, limited process, like a notebook kernel.

The code never runs in mistol's process. A worker (`_worker.py`, standard library only) runs
it in its own session, with:

- its own view of the files (a mount namespace, `_mounts.py`): the interpreter and system
  libraries read-only, a private working directory, /tmp, /var/tmp and /dev/shm on one tmpfs
  of `disk_mb` MB that ends with the worker, and nothing else (no home, no /root, no
  /etc/shadow, no host unix socket). Landlock (`_landlock.py`) locks that view: no mounting,
  no abstract unix sockets, no signals out. Where the kernel has no mount namespace, Landlock
  alone allows only the system paths and the working directory (on disk, no size cap), but
  host unix sockets stay reachable: `filesystem_isolation_available()` is then False and the
  caller must ask for each block;
- no network: its own network namespace, where only its own loopback exists. Where the
  kernel allows no namespace, `Sandbox` refuses to start unless `allow_network=True`;
- a PID namespace: the worker's parent is PID 1 there, and when it dies the kernel kills
  everything the code started, even processes that called setsid();
- RLIMIT_AS (a memory hog gets MemoryError), RLIMIT_CPU, and RLIMIT_NPROC against fork
  bombs. The kernel ignores RLIMIT_NPROC for root, so as root the worker switches to the
  user `nobody`, with no capability left (the interpreter, even in /root/.pyenv, is bound
  into its view). For other users the limit is counted inside the sandbox's own user
  namespace, so their other processes do not use it up, and the capabilities that namespace
  gives are dropped before the code runs;
- a wall-clock timeout: past it the whole sandbox is killed and started again;
- no way back to more rights: PR_SET_NO_NEW_PRIVS (setuid programs such as sudo do not work).

The code cannot reach the pipes that tell mistol how a block ended: they are held by a
process of the sandbox that never runs code (see `_worker.py`). Each status message is
bounded in size, must be JSON of the expected shape, and names the block it ends by a random
id; anything else stops the sandbox with a one-line note, and the next block gets a fresh one.

State (variables, imports, the files it wrote) lives on between `run` calls until a timeout, a
crash or `reset`.
Processes the code leaves running (a server, a fork bomb) are killed when its block ends, so
that they do not compete with the model for the CPU; with no PID namespace they live on until
the sandbox closes. Output that background threads write between runs is dropped.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from ..errors import MistolError

WORKER = str(Path(__file__).with_name("_worker.py"))
NOBODY = 65534
START_TIMEOUT_S = 20.0
DRAIN_S = 0.5  # reading the output a block left in the pipe, at most
MAX_MESSAGE = 1 << 16  # the worker's status messages are small; a longer one means the channel is broken
LOST_STATE = "the sandbox was restarted, so variables and imports from earlier blocks are gone"


@dataclass
class SandboxLimits:
    timeout_s: float = 30.0
    memory_mb: int = 2048  # RLIMIT_AS: address space, so a little above what is really used
    cpu_s: int = 60  # CPU seconds per run for the worker, and for each process it starts
    max_processes: int = 64  # processes and threads the code may have at once
    max_output_chars: int = 4000  # longer output keeps its head and tail
    disk_mb: int = 512  # the code's files: working directory, /tmp, /var/tmp and /dev/shm together
    allow_network: bool = False


@dataclass
class Isolation:
    """What the running worker actually got; the chat may show it."""

    network: bool  # own network namespace: no access to the network
    pid_namespace: bool  # killing the sandbox ends every process the code started
    user: str  # whom the code runs as: "nobody ..." when mistol runs as root, else the uid
    process_limit: int | None  # RLIMIT_NPROC in force, None where the kernel ignores it
    filesystem: str = "none"  # how the code's view of the files is confined ("none": the user's files)
    syscalls: str = "not filtered"  # keyrings, SysV IPC, memory files refused ("filtered"), or why not


@dataclass
class RunResult:
    output: str  # stdout and stderr in the order written, then any note from the sandbox
    ok: bool = True  # the code ran to its end without an exception
    timed_out: bool = False
    interrupted: bool = False  # Ctrl-C stopped it
    restarted: bool = False  # variables and imports from earlier runs are gone
    exit_status: int | None = None  # how the worker ended when it died during the run
    cut_chars: int = 0  # characters left out of the middle of the output


@functools.cache
def network_isolation_available() -> bool:
    """Whether this system lets the sandbox run without network (a network namespace)."""
    return _worker_probe("--probe")


@functools.cache
def filesystem_isolation_available() -> bool:
    """Whether this system can keep the code from the person's files and sockets (a mount namespace)."""
    return _worker_probe("--probe-files")


def _worker_probe(flag: str) -> bool:
    """Whether the worker, started with `flag`, could set up what that probe checks."""
    if sys.platform != "linux":
        return False
    try:
        probe = subprocess.run([sys.executable, "-I", WORKER, flag], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=START_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


class Sandbox:
    def __init__(self, limits: SandboxLimits | None = None, workdir: str | Path | None = None):
        if sys.platform != "linux":
            raise MistolError(f"running code needs Linux (namespaces, rlimits); this is {sys.platform}")
        self.limits = limits or SandboxLimits()
        if self.limits.disk_mb < 1:  # a tmpfs of size 0 would have no limit at all
            raise MistolError(f"the code's disk limit must be at least 1 MB (got {self.limits.disk_mb})")
        own = workdir is None
        if not own and not Path(workdir).is_dir():
            raise MistolError(f"{workdir}: no such directory for the code sandbox")
        self.workdir = Path(tempfile.mkdtemp(prefix="mistol-sandbox-") if own else workdir).resolve()
        self._drop_to = None
        if os.geteuid() == 0:  # the worker runs as nobody (see the module's docstring)
            try:
                if own:
                    os.chown(self.workdir, NOBODY, NOBODY)
                self._drop_to = NOBODY
            except OSError:  # root of a user namespace where nobody is not mapped
                pass
        self._live: list[_Worker] = []  # the current worker, shared with the finalizer
        self._finalizer = weakref.finalize(self, _cleanup, self._live, self.workdir if own else None)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @property
    def isolation(self) -> Isolation | None:
        return self._live[0].isolation if self._live else None

    @property
    def worker_pid(self) -> int | None:
        """The process that runs the code, as mistol sees it (for signals and tests)."""
        return self._live[0].pid if self._live else None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, code: str) -> RunResult:
        """Run `code` in the worker and return what it printed (and how it ended)."""
        restarted = False
        out = _Output(self.limits.max_output_chars)
        if not self._live or not self._live[0].alive():
            self._restart()
            restarted = True
            out.add(f"(the sandbox had stopped: {LOST_STATE})\n")
        worker = self._live[0]
        worker.drain(_Output(0))  # what background processes wrote since the last run is not this run's
        if (leftover := worker.unexpected()) is not None:  # e.g. the code ended its last block early
            return self._broken(out, leftover)
        block = secrets.token_hex(8)  # a reply for any other block is refused, so outputs never shift
        try:
            worker.send({"code": code, "id": block})
        except OSError:
            return self._died(out)
        deadline = time.monotonic() + self.limits.timeout_s
        interrupted, grace = False, None
        while True:
            try:
                outcome = worker.pump(out, deadline if grace is None else min(deadline, grace))
            except KeyboardInterrupt:
                if interrupted:
                    outcome = "interrupt"
                else:  # a KeyboardInterrupt inside the code first: its state survives that
                    interrupted, grace = True, time.monotonic() + 2.0
                    _signal(worker.pid, signal.SIGINT)
                    continue
            if outcome == "timeout" and grace is not None and time.monotonic() < deadline:
                outcome = "interrupt"
            break
        if isinstance(outcome, dict):
            if set(outcome) == {"ok", "id"} and outcome["id"] == block and isinstance(outcome["ok"], bool):
                return _result(out, ok=outcome["ok"], interrupted=interrupted, restarted=restarted)
            return self._broken(out, outcome)
        if outcome == "died":
            return self._died(out)
        self._restart()
        if outcome == "timeout":
            note = f"TimeoutError: the code ran longer than {self.limits.timeout_s:g} s and was stopped; {LOST_STATE}"
            return _result(out, note, ok=False, timed_out=True, restarted=True)
        note = f"KeyboardInterrupt: stopped by the user; {LOST_STATE}"
        return _result(out, note, ok=False, interrupted=True, restarted=True)

    def reset(self) -> None:
        """Start a fresh worker: variables, imports and the files the code wrote are gone."""
        self._restart()

    def close(self) -> None:
        """Kill the worker and everything it started; delete the directory if it was ours."""
        self._finalizer()

    def _start(self) -> None:
        self._live.append(_Worker(self.limits, self.workdir, self._drop_to))

    def _restart(self) -> None:
        while self._live:
            self._live.pop().kill()
        self._start()

    def _died(self, out: _Output) -> RunResult:
        worker = self._live[0]
        status = worker.wait(2.0)  # let it end on its own: its status tells why
        worker.drain(out)
        self._restart()
        why = "ended" if status is None else worker.describe_exit(status)
        note = f"SandboxError: the Python process running the code {why}; {LOST_STATE}"
        return _result(out, note, ok=False, restarted=True, exit_status=status)

    def _broken(self, out: _Output, message: dict) -> RunResult:
        """The worker's status channel carried something it should not: start afresh, say why."""
        self._live[0].drain(out)
        self._restart()
        why = message.get("broken") if isinstance(message.get("broken"), str) else "an unexpected status message"
        note = (f"SandboxError: the code wrote to the sandbox's own channel ({why[:200]}), "
                f"so the sandbox was stopped; {LOST_STATE}")
        return _result(out, note, ok=False, restarted=True)


def _result(out: _Output, note: str = "", **fields) -> RunResult:
    text, cut = out.text()
    if note:  # after the cut, so that it is always seen
        text += ("\n" if text and not text.endswith("\n") else "") + note + "\n"
    return RunResult(output=text, cut_chars=cut, **fields)


def _cleanup(live: list, workdir: Path | None) -> None:
    """Close a sandbox (also when it is garbage collected, or at exit)."""
    while live:
        live.pop().kill()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


def _signal(pid: int, sig: int) -> None:
    try:
        if pid < 0:
            os.killpg(-pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Worker:
    """One worker process tree and its three pipes."""

    def __init__(self, limits: SandboxLimits, workdir: Path, drop_to: int | None):
        self.limits = limits
        ctl_r, ctl_w = os.pipe()
        status_r, status_w = os.pipe()
        config = {
            "ctl": ctl_r, "status": status_w, "memory_mb": limits.memory_mb, "cpu_s": limits.cpu_s,
            "max_processes": limits.max_processes, "allow_network": limits.allow_network, "drop_to": drop_to,
            "workdir": str(workdir), "disk_mb": limits.disk_mb,
        }
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-u", "-X", "utf8", WORKER, json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                pass_fds=(ctl_r, status_w), cwd=workdir, env=_environment(limits, workdir), start_new_session=True,
            )
        except BaseException:
            for fd in (ctl_r, ctl_w, status_r, status_w):
                os.close(fd)
            raise
        os.close(ctl_r)
        os.close(status_w)
        self.ctl = ctl_w
        self.status = _Messages(status_r)
        self.output = self.proc.stdout.fileno()
        os.set_blocking(self.output, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.output, selectors.EVENT_READ, "output")
        self.selector.register(status_r, selectors.EVENT_READ, "status")
        self.pid = self.init_pid = None
        self.isolation: Isolation | None = None
        out = _Output(2000)
        try:
            ready = self.pump(out, time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise
        if isinstance(ready, dict) and ready.get("ready"):
            try:
                self.pid, self.init_pid = int(ready["pid"]), ready["init_pid"]
                self.isolation = Isolation(**ready["isolation"])
                return
            except (KeyError, TypeError, ValueError):
                ready = {"error": "its first message is not a ready message"}
        self.kill()
        unshare_failed = isinstance(ready, dict) and str(ready.get("error", "")).startswith("unshare")
        if unshare_failed and not limits.allow_network:
            raise MistolError(
                f"cannot run code without network access: this system does not allow network namespaces "
                f"({ready['error']}); allow network access (--allow-network) to run it anyway"
            )
        detail = (ready.get("error") or ready.get("broken")) if isinstance(ready, dict) else ready
        raise MistolError(f"the code sandbox did not start ({detail}): {out.text()[0].strip() or 'no output'}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, message: dict) -> None:
        data = json.dumps(message).encode()
        data = struct.pack(">I", len(data)) + data
        while data:
            data = data[os.write(self.ctl, data):]

    def unexpected(self) -> dict | None:
        """A status message that came while no block ran (the channel is then broken), else None."""
        self.status.read()
        try:
            message = self.status.next()
        except ValueError as e:
            return {"broken": str(e)}
        return None if message is None else message if "broken" in message else {"broken": "a reply after its block"}

    def pump(self, out: _Output, deadline: float) -> dict | str:
        """Collect output until the worker's next message; else "died" or "timeout". A message
        that cannot be read comes back as {"broken": why}."""
        while True:
            try:
                message = self.status.next()
            except ValueError as e:
                message = {"broken": str(e)}
            if message is not None:
                self.drain(out)
                return message
            if self.status.eof or self.proc.poll() is not None:
                self.drain(out)
                return "died"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            for key, _ in self.selector.select(min(remaining, 0.1)):
                if key.data == "status":
                    self.status.read()
                elif self._read(out) == b"":  # end of file: every holder closed it
                    self.selector.unregister(key.fileobj)

    def drain(self, out: _Output) -> None:
        """Read the output there is: what the worker wrote before its message is in the pipe.
        Bounded in time, so that processes the code left writing cannot hold the block open."""
        deadline = time.monotonic() + DRAIN_S
        while self._read(out) and time.monotonic() < deadline:
            pass

    def _read(self, out: _Output) -> bytes | None:
        """Read what is there: b"" at end of file, None when nothing is there for now."""
        try:
            data = os.read(self.output, 1 << 16)
        except OSError:  # BlockingIOError included
            return None
        out.add_bytes(data)
        return data

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """Kill its PID 1 where it has one (the kernel then kills the rest), else its process group."""
        if self.proc.poll() is None and self.init_pid is not None:
            _signal(self.init_pid, signal.SIGKILL)
        if self.init_pid is None:
            _signal(-self.proc.pid, signal.SIGKILL)
        if self.wait(5.0) is None:
            _signal(-self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.selector.close()
        self.proc.stdout.close()
        os.close(self.ctl)
        self.status.close()

    def describe_exit(self, status: int) -> str:
        # The status is relayed by the worker's parent (init, or the launcher), as a shell would: 128 + signal.
        sig = -status if status < 0 else status - 128 if status > 128 else None
        if not sig:
            return f"exited with status {status}"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        why = f" (the CPU time limit of {self.limits.cpu_s} s was reached)" if sig == signal.SIGXCPU else ""
        return f"was killed by {name}{why}"


def _environment(limits: SandboxLimits, workdir: Path) -> dict[str, str]:
    """A small environment: no secrets of the user's shell, a home inside the sandbox."""
    threads = str(max(1, min(os.cpu_count() or 1, limits.max_processes // 4)))
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
    env = {"PATH": path, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8", "MPLBACKEND": "Agg",
           "USER": "sandbox", "LOGNAME": "sandbox",
           # each thread's malloc arena reserves 64 MiB of address space, which RLIMIT_AS counts
           "MALLOC_ARENA_MAX": "2"}
    # BLAS pools start one thread per core; each counts against max_processes
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[name] = threads
    return env


class _Messages:
    """Length-prefixed JSON objects read from a non-blocking pipe, each at most MAX_MESSAGE bytes."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.eof = fd, b"", False
        os.set_blocking(fd, False)

    def read(self) -> None:
        if len(self.buf) > MAX_MESSAGE + 4:
            return  # next() refuses what is there; reading more would only grow the buffer
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        self.eof = not data
        self.buf += data

    def next(self) -> dict | None:
        """The next whole message, None while it is incomplete; ValueError when it is not one."""
        if len(self.buf) < 4:
            return None
        size = struct.unpack(">I", self.buf[:4])[0]
        if size > MAX_MESSAGE:
            raise ValueError(f"a status message of {size} bytes")
        if len(self.buf) < 4 + size:
            return None
        body, self.buf = self.buf[4:4 + size], self.buf[4 + size:]
        try:
            message = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError included; deep nesting
            raise ValueError("a status message that is not JSON") from None
        if not isinstance(message, dict):
            raise ValueError("a status message that is not a JSON object")
        return message

    def close(self) -> None:
        os.close(self.fd)


class _Output:
    """The first and last `limit` characters of a stream, and its length, in bounded memory."""

    def __init__(self, limit: int):
        self.limit = limit
        self.head = self.tail = ""
        self.total = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add_bytes(self, data: bytes) -> None:
        self.add(self._decoder.decode(data, final=not data))

    def add(self, text: str) -> None:
        self.total += len(text)
        if len(self.head) < self.limit:
            self.head += text[: self.limit - len(self.head)]
        self.tail = (self.tail + text)[-self.limit:] if self.limit else ""

    def text(self) -> tuple[str, int]:
        """The output, or its head and tail around a note; and how many characters were cut."""
        if self.total <= self.limit:
            return self.head, 0
        head = self.head[: self.limit // 2]
        tail = self.tail[len(self.tail) - (self.limit - len(head)):]
        # cut at line ends where one is near, so that no line is shown in part
        if (i := head.rfind("\n", len(head) // 2)) >= 0:
            head = head[: i + 1]
        if (i := tail.find("\n", 0, len(tail) // 2)) >= 0:
            tail = tail[i + 1:]
        cut = self.total - len(head) - len(tail)
        head += "" if head.endswith("\n") else "\n"
        return f"{head}[... {cut} characters cut ...]\n{tail}", cut
