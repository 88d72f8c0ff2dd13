"""The sandbox's status channel against the code it runs, and `mistol exec`'s exit status.

Each attack is real code run in a real worker, through the chat path (CodeRunner, the
runner of `mistol chat`) and through `mistol exec` in a process of its own: the code writes
forged status messages to every descriptor it has. The channel to mistol is not among them;
what it can reach (the worker's reply pipe) is checked, so a forgery ends that sandbox with
a one-line note, and the next block runs in a fresh one, its output its own.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mistol.sandbox.code_turn import CodeOptions, CodeRunner
from mistol.sandbox.codeblocks import CodeBlock
from mistol.sandbox.sandbox import Sandbox, SandboxLimits, network_isolation_available

ROOT = Path(__file__).resolve().parents[1]
ALLOW_NETWORK = not network_isolation_available()
NOTE = "SandboxError: the code wrote to the sandbox's own channel"


def forge(payload: bytes, then: str = "") -> str:
    """Code that writes `payload` to every descriptor it holds beyond stdin, stdout and stderr."""
    return f"""
import os
payload = {payload!r}
for name in os.listdir("/proc/self/fd"):
    if int(name) > 2:
        try:
            os.write(int(name), payload)
        except OSError:
            pass
{then}
"""


def frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


FLOOD = forge(struct.pack(">I", 0xFFFFFFF0), then="""
chunk = b"A" * (1 << 20)
for _ in range(100):
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            try:
                os.write(int(name), chunk)
            except OSError:
                pass
""")


@pytest.fixture
def runner():
    runner = CodeRunner(CodeOptions(auto_yes=True, limits=SandboxLimits(timeout_s=10, allow_network=ALLOW_NETWORK)),
                        None, lambda text: None)
    yield runner
    runner.close()


def run(runner: CodeRunner, code: str) -> str:
    return runner.handle(CodeBlock("python", code))


def rss_kib(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def exec_file(tmp_path, code: str, *options: str, name: str = "script.py") -> tuple[subprocess.CompletedProcess, int]:
    """`mistol exec` on `code` in a process of its own: its result and its peak RSS in KiB."""
    script = tmp_path / name
    script.write_text(code)
    network = ["--allow-network"] if ALLOW_NETWORK else []
    proc = subprocess.Popen([sys.executable, "-m", "mistol", "exec", str(script), *options, *network],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    streams = {}
    readers = [threading.Thread(target=lambda n=n, f=f: streams.__setitem__(n, f.read().decode()))
               for n, f in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)  # its own peak RSS, which Popen.wait would not give
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    return subprocess.CompletedProcess(proc.args, proc.returncode, streams["out"], streams["err"]), usage.ru_maxrss


# -- the chat path -------------------------------------------------------------------------
def test_garbage_on_the_status_channel_is_one_line_and_the_next_block_runs_afresh(runner):
    output = run(runner, forge(b"\0\0\0\x09{not json", then="import time; time.sleep(1); print('still here')"))
    assert output.splitlines()[-1].startswith(NOTE) and "not JSON" in output
    assert "Traceback" not in output and "still here" not in output
    assert run(runner, "print(6 * 7)") == "42\n"


def test_a_deeply_nested_forged_reply_is_a_forgery_not_a_crash(runner):
    body = b"[" * 8000 + b"]" * 8000  # within the size cap, past the JSON decoder's recursion limit
    output = run(runner, forge(struct.pack(">I", len(body)) + body, then="import time; time.sleep(1)"))
    assert output.splitlines()[-1].startswith(NOTE) and "not JSON" in output, output
    assert run(runner, "print(6 * 7)") == "42\n"


def test_a_forged_ok_does_not_shift_the_output_of_later_blocks(runner):
    assert run(runner, "x = 1\nprint('first')") == "first\n"
    output = run(runner, forge(frame({"ok": True}), then="import time; time.sleep(0.5); print('late')"))
    assert NOTE in output and "late" not in output
    outputs = [run(runner, f"print({i})") for i in range(3)]
    assert outputs == ["0\n", "1\n", "2\n"]


def test_a_forged_ok_with_the_blocks_own_id_ends_only_that_block(runner):
    """The code may find its own block's id (it is in its own process) and end its block
    early; the worker's real reply then comes for no block, and is refused: a later block
    gets a note and a fresh sandbox, never another block's result."""
    steal = """
import sys, os, time
f = sys._getframe()
while "request" not in f.f_locals:
    f = f.f_back
block = f.f_locals["request"]["id"]
""" + forge(b"", then="") + """
import json, struct
body = json.dumps({"ok": True, "id": block}).encode()
for name in os.listdir("/proc/self/fd"):
    if int(name) > 2:
        try:
            os.write(int(name), struct.pack(">I", len(body)) + body)
        except OSError:
            pass
time.sleep(1)
"""
    run(runner, steal)
    outputs = [run(runner, f"print({i})") for i in range(4)]
    assert all(out == f"{i}\n" or NOTE in out for i, out in enumerate(outputs)), outputs
    assert outputs[-2:] == ["2\n", "3\n"]


def test_closing_or_replacing_the_workers_pipes_is_a_note_not_a_traceback(runner):
    output = run(runner, "import os\nos.closerange(3, 1024)\nprint('closed')")
    assert output.splitlines()[-1].startswith(NOTE) and "Traceback" not in output
    assert run(runner, "print('fresh')") == "fresh\n"
    output = run(runner, "import os\nfor fd in range(3, 64):\n    try: os.dup2(1, fd)\n    except OSError: pass")
    assert "Traceback" not in output and output.splitlines()[-1].startswith(("SandboxError", "TimeoutError")), output
    assert run(runner, "print('again')") == "again\n"


def test_a_huge_length_and_a_flood_keep_mistols_memory_bounded(runner):
    run(runner, "print('warm')")
    before = rss_kib()
    output = run(runner, FLOOD)
    assert rss_kib() - before < 20 * 1024, "the parent grew by the flood"
    assert output.splitlines()[-1].startswith(NOTE) and "bytes" in output
    assert run(runner, "print('next')") == "next\n"


# -- mistol exec ---------------------------------------------------------------------------
def test_exec_of_forged_status_bytes_is_a_one_line_note_and_exit_status_1(tmp_path):
    result, _ = exec_file(tmp_path, forge(b"\0\0\0\x09{not json"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith(NOTE)


def test_exec_under_a_flood_stays_small(tmp_path):
    _, baseline = exec_file(tmp_path, "print(1)", name="baseline.py")
    result, peak = exec_file(tmp_path, FLOOD)
    assert result.returncode == 1 and result.stdout.splitlines()[-1].startswith(NOTE), result.stdout
    assert "Traceback" not in result.stderr
    assert peak < baseline + 30 * 1024, f"peak RSS {peak} KiB against {baseline} KiB for print(1)"


@pytest.mark.parametrize("code, status", [
    ("print('fine')", 0),
    ("1 / 0", 1),
    ("import sys; sys.exit(3)", 1),
    ("block = bytearray(512 * 2**20)", 1),
    ("import os; os._exit(9)", 1),
    ("while True: pass", 124),
])
def test_exec_exit_status_says_how_the_code_ended(tmp_path, code, status):
    result, _ = exec_file(tmp_path, code, "--timeout", "2", "--memory", "256")
    assert result.returncode == status, (result.stdout, result.stderr)
    assert result.stderr == ""


# -- mistol's own end of the channel -------------------------------------------------------
def forge_on_mistols_end(sandbox: Sandbox, data: bytes) -> threading.Thread:
    """Write `data` into the pipe mistol reads the sandbox's status from, through /proc as a
    process of the same user could (where the code's /proc shows mistol's process), in a thread."""
    fd = os.open(f"/proc/self/fd/{sandbox._live[0].status.fd}", os.O_WRONLY)

    def write():
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:  # the sandbox was stopped and the pipe closed: the flood ends
            pass
        finally:
            os.close(fd)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


def test_mistol_checks_its_end_of_the_channel_too():
    limits = SandboxLimits(timeout_s=10, allow_network=ALLOW_NETWORK)
    with Sandbox(limits) as sandbox:
        forge_on_mistols_end(sandbox, b"\0\0\0\x09{not json").join()
        output = sandbox.run("print('a')").output
        assert output.splitlines()[-1].startswith(NOTE) and "Traceback" not in output
        assert sandbox.run("print('b')").output == "b\n"

        forge_on_mistols_end(sandbox, frame({"ok": True})).join()  # a stale reply waiting before a block
        assert NOTE in sandbox.run("print('c')").output
        forge_on_mistols_end(sandbox, frame({"ok": True, "id": "0123456789abcdef"}))  # a guessed id
        assert NOTE in sandbox.run("import time; time.sleep(0.5); print('slow')").output
        assert [sandbox.run(f"print({i})").output for i in range(3)] == ["0\n", "1\n", "2\n"]

        before = rss_kib()
        writer = forge_on_mistols_end(sandbox, struct.pack(">I", 0xFFFFFFF0) + b"A" * (100 << 20))
        output = sandbox.run("import time; time.sleep(0.5)").output
        writer.join(30)
        assert rss_kib() - before < 20 * 1024
        assert NOTE in output and "bytes" in output
        assert sandbox.run("print('after')").output == "after\n"
