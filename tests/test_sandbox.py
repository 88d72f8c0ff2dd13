"""The code sandbox, with real worker processes: state, output, limits, isolation, cleanup."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from mistol.cli import main
from mistol.commands import exec as exec_command
from mistol.sandbox.sandbox import Sandbox, SandboxLimits, network_isolation_available

NO_NAMESPACES = "the kernel allows no network namespace here (unshare fails), so the sandbox cannot cut the network"


@pytest.fixture
def sandbox():
    with Sandbox(SandboxLimits(timeout_s=5, allow_network=not network_isolation_available())) as sb:
        yield sb


def processes_of(sb: Sandbox) -> set[int]:
    """Host pids of the sandbox's processes: in its PID namespace, or else in its process group."""
    ns = os.readlink(f"/proc/{sb.worker_pid}/ns/pid") if sb.isolation.pid_namespace else None
    group = os.getpgid(sb.worker_pid)
    return {p for p in _all_pids() if (_ns(p) == ns if ns else _group(p) == group)}


def leftovers(ns: str | None, group: int, wait_s: float = 3.0) -> set[int]:
    """Processes still in the namespace or group, waiting a little for the kernel to reap them."""
    deadline = time.monotonic() + wait_s
    while True:
        left = {p for p in _all_pids() if (ns and _ns(p) == ns) or _group(p) == group}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# -- running code like a REPL --------------------------------------------------------------
def test_state_persists_between_blocks(sandbox):
    assert sandbox.run("import math\ndef area(r):\n    return math.pi * r * r\nradius = 2").output == ""
    result = sandbox.run("print(round(area(radius), 3))")
    assert result.output == "12.566\n" and result.ok and not result.restarted


def test_the_value_of_a_last_bare_expression_is_printed():
    with Sandbox(SandboxLimits(allow_network=True)) as sb:
        assert sb.run("x = 2\nx * 21").output == "42\n"
        assert sb.run("1\n'only the last'").output == "'only the last'\n"
        assert sb.run("None").output == ""
        assert sb.run("print('hi')").output == "hi\n"  # not followed by None
        assert sb.run("_").output == "'only the last'\n"  # like the REPL's _


def test_stdout_and_stderr_keep_the_order_they_were_written_in(sandbox):
    code = (
        "import os, subprocess, sys\n"
        "print('a')\nprint('b', file=sys.stderr)\nprint('c')\nsys.stderr.write('d\\n')\n"
        "os.system('echo e')\nsubprocess.run([sys.executable, '-c', 'import sys; print(\"f\", file=sys.stderr)'])\n"
        "print('g')"
    )
    assert sandbox.run(code).output == "a\nb\nc\nd\ne\nf\ng\n"


def test_a_traceback_shows_the_users_frames_and_none_of_the_worker(sandbox):
    result = sandbox.run("def inner():\n    return 1 / 0\n\ndef outer():\n    return inner()\n\nouter()")
    assert not result.ok
    lines = result.output.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert '"<cell 1>", line 7, in <module>' in result.output and "in inner" in result.output
    assert "_worker" not in result.output and "mistol" not in result.output
    syntax = sandbox.run("def broken(:\n    pass")
    assert "SyntaxError" in syntax.output and "_worker" not in syntax.output and "<cell 2>" in syntax.output
    assert sandbox.run("'still alive'").output == "'still alive'\n"


def test_a_fork_of_the_code_does_not_take_over_the_worker(sandbox):
    code = "import os\npid = os.fork()\nif pid == 0:\n    print('child')\nelse:\n    os.waitpid(pid, 0)\n    print('parent')"
    assert sandbox.run(code).output == "child\nparent\n"
    assert sandbox.run("pid > 0").output == "True\n"


def test_the_worker_does_not_import_torch_and_runs_in_its_own_temporary_directory():
    sb = Sandbox(SandboxLimits(allow_network=not network_isolation_available()))
    try:
        workdir = sb.workdir
        assert workdir.is_dir() and workdir != os.getcwd()
        assert sb.run("import os, sys\nprint(os.getcwd())\n'torch' in sys.modules").output == f"{workdir}\nFalse\n"
        sb.run("open('made.txt', 'w').write('hi')")
        assert sb.run("open('made.txt').read()").output == "'hi'\n"
        if sb.isolation.filesystem.startswith("private root"):  # on its own tmpfs, not on the host's disk
            assert not (workdir / "made.txt").exists()
        else:
            assert (workdir / "made.txt").read_text() == "hi"
        assert sb.run("import os\nos.getpgid(0) == os.getpid()").output == "False\n"  # not in mistol's group
        assert os.getpgid(sb.worker_pid) != os.getpgid(0)
    finally:
        sb.close()
    assert not workdir.exists()


# -- limits --------------------------------------------------------------------------------
def test_an_endless_loop_is_stopped_at_the_timeout_and_the_next_block_runs():
    with Sandbox(SandboxLimits(timeout_s=2, allow_network=not network_isolation_available())) as sb:
        sb.run("x = 1")
        start = time.monotonic()
        result = sb.run("print('before')\nwhile True:\n    pass")
        elapsed = time.monotonic() - start
        assert result.timed_out and result.restarted and not result.ok
        assert 2 <= elapsed < 4
        assert result.output.startswith("before\n")
        assert "TimeoutError: the code ran longer than 2 s and was stopped" in result.output
        after = sb.run("'x' in globals()")
        assert after.output == "False\n" and after.ok  # a fresh worker


def test_allocating_8_gib_gives_memory_error_inside_and_the_worker_survives(sandbox):
    sandbox.run("kept = 'yes'")
    result = sandbox.run("block = bytearray(8 * 2**30)")
    assert result.output.splitlines()[-1] == "MemoryError" and not result.restarted
    assert sandbox.run("kept").output == "'yes'\n"


def test_a_fork_bomb_is_contained_and_nothing_survives():
    limits = SandboxLimits(timeout_s=3, max_processes=16, allow_network=not network_isolation_available())
    with Sandbox(limits) as sb:
        if sb.isolation.process_limit is None:
            pytest.skip("RLIMIT_NPROC is not enforced here (root that could not switch to nobody): not running a fork bomb")
        ns = os.readlink(f"/proc/{sb.worker_pid}/ns/pid") if sb.isolation.pid_namespace else None
        group = os.getpgid(sb.worker_pid)
        result = sb.run("import os\nwhile True:\n    os.fork()")
        assert "BlockingIOError" in result.output or result.timed_out
        if sb.isolation.pid_namespace:  # the block's leftover processes end with it
            assert len(processes_of(sb)) == 2  # the namespace's PID 1 and the worker
        assert sb.run("6 * 7").output == "42\n"
    assert leftovers(ns, group) == set()


def test_processes_the_code_leaves_running_end_with_the_block(sandbox):
    if not sandbox.isolation.pid_namespace:
        pytest.skip("no PID namespace here: background processes live until the sandbox closes")
    result = sandbox.run("import subprocess\np = subprocess.Popen(['sleep', '60'], start_new_session=True)\np.pid")
    assert result.ok
    assert len(processes_of(sandbox)) == 2
    ns, group = os.readlink(f"/proc/{sandbox.worker_pid}/ns/pid"), os.getpgid(sandbox.worker_pid)
    sandbox.close()
    assert leftovers(ns, group) == set()


def test_a_crash_restarts_the_worker_and_says_so(sandbox):
    result = sandbox.run("import os\nos._exit(3)")
    assert result.restarted and not result.ok and result.exit_status == 3
    assert "SandboxError: the Python process running the code exited with status 3" in result.output
    assert "earlier blocks are gone" in result.output
    assert sandbox.run("1 + 1").output == "2\n"


def test_long_output_keeps_its_head_and_tail_and_says_how_much_was_cut():
    with Sandbox(SandboxLimits(max_output_chars=1000, allow_network=not network_isolation_available())) as sb:
        result = sb.run("print('START' + 'x' * 20000 + 'END')")
    assert result.cut_chars == 20009 - 1000
    assert result.output.startswith("STARTxxx") and result.output.endswith("xxxEND\n")
    assert f"\n[... {result.cut_chars} characters cut ...]\n" in result.output
    assert len(result.output) < 1100


def test_ctrl_c_interrupts_the_code_and_keeps_the_state(sandbox):
    sandbox.run("kept = 1")
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        result = sandbox.run("import time\ntime.sleep(30)")
    finally:
        timer.cancel()
    assert result.interrupted and not result.restarted
    assert result.output.splitlines()[-1] == "KeyboardInterrupt" and "_worker" not in result.output
    assert sandbox.run("kept").output == "1\n"


# -- network -------------------------------------------------------------------------------
def test_no_network_inside_by_default():
    if not network_isolation_available():
        pytest.skip(NO_NAMESPACES)
    with socket.create_server(("127.0.0.1", 0)) as server, Sandbox(SandboxLimits(timeout_s=10)) as sb:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        assert sb.isolation.network
        result = sb.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)")
        assert not result.ok and "ConnectionRefusedError" in result.output
        with pytest.raises(TimeoutError):
            server.accept()
        # the sandbox's own loopback works: a server inside, a client inside
        inside = sb.run("s = socket.create_server(('127.0.0.1', 0))\nc = socket.create_connection(s.getsockname())\n'ok'")
        assert inside.output == "'ok'\n"


def test_with_allow_network_the_same_connection_works():
    with socket.create_server(("127.0.0.1", 0)) as server, Sandbox(SandboxLimits(allow_network=True)) as sb:
        port = server.getsockname()[1]
        assert not sb.isolation.network
        result = sb.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n'connected'")
        assert result.output == "'connected'\n"


def run_where_namespaces_fail(code: str) -> subprocess.CompletedProcess:
    """Run Python `code` where new network and PID namespaces cannot be made.

    It runs in a user namespace of its own whose limits allow none (the limits are per user
    namespace, so nothing outside changes), as on kernels that forbid them.
    """
    if not shutil.which("unshare") or subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a user namespace here to simulate a kernel without namespaces")
    setup = 'echo 0 > /proc/sys/user/max_net_namespaces && echo 0 > /proc/sys/user/max_pid_namespaces && exec "$0" -c "$1"'
    return subprocess.run(["unshare", "-U", "-r", "sh", "-c", setup, sys.executable, code],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_without_namespaces_the_sandbox_refuses_to_start_unless_network_is_allowed(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import os\nprint(6 * 7)\n")
    code = f"""
from mistol.errors import MistolError
from mistol.cli import main
from mistol.sandbox.sandbox import Sandbox, SandboxLimits, network_isolation_available
print(network_isolation_available())
try:
    Sandbox()
except MistolError as e:
    print("refused:", e)
print(main(["exec", {str(script)!r}]))
print(main(["exec", {str(script)!r}, "--allow-network"]))
with Sandbox(SandboxLimits(allow_network=True, timeout_s=3)) as sb:
    print(sb.isolation.network, sb.isolation.pid_namespace, sb.run("while True: pass").timed_out)
    print(sb.run("'alive'").output, end="")
"""
    result = run_where_namespaces_fail(code)
    lines = result.stdout.splitlines()
    assert lines[0] == "False"
    assert lines[1].startswith("refused: cannot run code without network access") and "--allow-network" in lines[1]
    assert lines[2:] == ["1", "42", "0", "False False True", "'alive'"], result.stderr
    assert result.stderr.startswith("mistol: error: cannot run code without network access")


# -- mistol exec ---------------------------------------------------------------------------
def test_exec_prints_what_the_model_would_see(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7\n")
    network = [] if network_isolation_available() else ["--allow-network"]
    assert main(["exec", str(script), "--timeout", "10", *network]) == 0
    assert capsys.readouterr().out == "out\nerr\n42\n"

    parser = argparse.ArgumentParser(prog="mistol")
    exec_command.register(parser.add_subparsers(dest="command"))
    script.write_text("block = bytearray(512 * 2**20)")
    args = parser.parse_args(["exec", str(script), "--memory", "256", *network])
    assert args.run(args) == 1  # the code raised
    assert capsys.readouterr().out.splitlines()[-1] == "MemoryError"


def test_exec_of_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["exec", str(tmp_path / "missing.py")]) == 1
    assert capsys.readouterr().err == f"mistol: error: {tmp_path / 'missing.py'}: no such file\n"
