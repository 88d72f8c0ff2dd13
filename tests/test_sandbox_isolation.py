"""The code's view of the files: attacks run as real code, as root and as an unprivileged user.

Each attack is what model-written code could try: read /etc/shadow and the person's files
(0600 and 0644) in their home, connect to a unix socket bound in the host's /tmp, leave
files behind in /tmp, /var/tmp, /dev/shm or its directory, fill the disk.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from mistol.cli import main
from mistol.sandbox.sandbox import Sandbox, SandboxLimits, filesystem_isolation_available, network_isolation_available

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534

# Prints one JSON object: what each attack got: "reached" (a hole), a directory's listing, or the error.
ATTACK = r'''
import json, os, socket, sys
targets = json.loads(sys.argv[1] if len(sys.argv) > 1 else TARGETS)
got = {}
def attempt(name, action):
    try:
        got[name] = action() or "reached"
    except OSError as e:
        got[name] = type(e).__name__
for path in targets["files"]:
    attempt(path, lambda p=path: open(p, "rb").read(1) and None)
for path in targets["dirs"]:
    attempt(path, lambda p=path: sorted(os.listdir(p)) or "reached")
for path in targets["sockets"]:
    def connect(p=path):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(p)
    attempt(path, connect)
print(json.dumps(got))
'''


def attack_code(targets: dict) -> str:
    return f"TARGETS = {json.dumps(json.dumps(targets))}\n" + ATTACK


def verdicts(output: str) -> dict:
    line = [x for x in output.splitlines() if x.startswith("{")]
    assert line, output
    return json.loads(line[-1])


def isolated_limits(**kw) -> SandboxLimits:
    return SandboxLimits(timeout_s=30, allow_network=not network_isolation_available(), **kw)


def private_root_or_skip(sb: Sandbox) -> None:
    if not sb.isolation.filesystem.startswith("private root"):
        pytest.skip(f"no mount namespace here (filesystem: {sb.isolation.filesystem})")


@pytest.fixture
def secrets():
    """A 0600 and a 0644 file in the person's home (root: under /root), and a unix socket in /tmp."""
    home = Path(pwd.getpwuid(os.getuid()).pw_dir if os.getuid() else "/root")
    made = home / f"mistol-test-{uuid.uuid4().hex[:8]}"
    made.mkdir(mode=0o755)
    (made / "private.txt").write_text("secret 0600")
    (made / "private.txt").chmod(0o600)
    (made / "public.txt").write_text("visible 0644")
    (made / "public.txt").chmod(0o644)
    sock_path = f"/tmp/mistol-test-{uuid.uuid4().hex[:8]}.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(sock_path)
    os.chmod(sock_path, 0o777)
    server.listen()
    targets = {"files": ["/etc/shadow", str(made / "private.txt"), str(made / "public.txt")],
               "dirs": list(dict.fromkeys([str(home), "/home", "/root", "/run", "/proc/1/root/root"])),
               "sockets": [sock_path]}
    try:
        yield targets
    finally:
        server.close()
        os.unlink(sock_path)
        shutil.rmtree(made)


def assert_nothing_reached(got: dict, targets: dict) -> None:
    """Nothing opened, connected or listed, but for the directories that lead to the interpreter."""
    wanted = targets["files"] + targets["dirs"] + targets["sockets"]
    assert sorted(got) == sorted(wanted)
    reached = {k: v for k, v in got.items() if v == "reached" or (isinstance(v, list) and set(v) - on_the_way(k))}
    assert reached == {}, f"the code reached {reached}"


def on_the_way(directory: str) -> set[str]:
    """The entries of `directory` that the code sees because the interpreter lives below it (/root/.pyenv)."""
    from mistol.sandbox._mounts import interpreter_paths

    prefix = directory.rstrip("/") + "/"
    return {p[len(prefix):].split("/")[0] for p in interpreter_paths() if p.startswith(prefix)}


# -- through the Sandbox API, as whoever runs the tests --------------------------------------
def test_the_code_sees_no_shadow_no_home_no_host_socket(secrets):
    with Sandbox(isolated_limits()) as sb:
        private_root_or_skip(sb)
        got = verdicts(sb.run(attack_code(secrets)).output)
        # the files are absent from its view, not merely forbidden (init's root in /proc may be both)
        assert all(v == "FileNotFoundError" or isinstance(v, list)
                   for k, v in got.items() if not k.startswith("/proc/")), json.dumps(got)
        assert_nothing_reached(got, secrets)
        seen = sb.run("import os\nsorted(os.listdir('/'))").output
        assert "home" not in seen and "run" not in seen and "sys" not in seen, seen


def test_ordinary_code_still_runs():
    with Sandbox(isolated_limits()) as sb:
        code = ("import os, subprocess, sys\nopen('mod_here.py', 'w').write('VALUE = 7')\n"
                "import mod_here\nprint(mod_here.VALUE, open('mod_here.py').read())\n"
                "print(subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout.strip())\n"
                "open('/dev/null', 'w').write('x'); print(len(open('/dev/urandom', 'rb').read(4)))\n"
                "import tempfile\nwith tempfile.TemporaryFile() as f: f.write(b'x')\nprint('ok')")
        assert sb.run(code).output == "7 VALUE = 7\n42\n4\nok\n"
        for module in ("numpy", "sympy"):
            if _installed(module):
                assert sb.run(f"import {module}\nprint('{module}')").output == f"{module}\n"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_files_written_by_the_code_are_gone_after_the_worker_ends():
    name = f"mistol-left-{uuid.uuid4().hex[:8]}"
    places = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", name]
    code = "\n".join(f"open({p!r}, 'w').write('left behind')" for p in places) + "\n'written'"
    sb = Sandbox(isolated_limits())
    try:
        private_root_or_skip(sb)
        workdir = sb.workdir
        assert sb.run(code).output == "'written'\n"
        assert sb.run(f"open({places[0]!r}).read()").output == "'left behind'\n"
        for place in places[:3]:  # never on the host, even while the worker runs
            assert not os.path.exists(place)
        sb.reset()  # a fresh worker: a fresh, empty tmpfs
        assert sb.run("import os\n" + " or ".join(f"os.path.exists({p!r})" for p in places)).output == "False\n"
    finally:
        sb.close()
    assert not workdir.exists()
    for place in places[:3]:
        assert not os.path.exists(place)


def test_writing_past_the_disk_cap_fails_inside_and_the_worker_survives():
    with Sandbox(isolated_limits(disk_mb=16)) as sb:
        private_root_or_skip(sb)
        sb.run("kept = 'yes'")
        code = ("import errno\ntry:\n    with open('/tmp/fill', 'wb') as f:\n        f.write(b'x' * (64 << 20))\n"
                "except OSError as e:\n    print(errno.errorcode[e.errno], e.strerror)")
        result = sb.run(code)
        assert result.output == "ENOSPC No space left on device\n" and result.ok and not result.restarted
        # the working directory draws on the same 16 MB
        result = sb.run("try:\n    open('more', 'wb').write(b'y' * (1 << 20))\nexcept OSError as e:\n    print(e.strerror)")
        assert result.output == "No space left on device\n"
        # freeing space makes room again
        assert sb.run("import os\nos.remove('/tmp/fill')\nopen('more', 'wb').write(b'y' * (1 << 20))").output == "1048576\n"
        assert sb.run("kept").output == "'yes'\n"


def test_a_disk_cap_below_one_mb_is_refused():
    from mistol.errors import MistolError

    with pytest.raises(MistolError, match="at least 1 MB"):
        Sandbox(SandboxLimits(disk_mb=0))


def test_exec_reports_the_attacks_held(secrets, tmp_path, capsys):
    script = tmp_path / "attack.py"
    script.write_text(attack_code(secrets))
    network = [] if network_isolation_available() else ["--allow-network"]
    assert main(["exec", str(script), "--disk", "64", *network]) == 0
    got = verdicts(capsys.readouterr().out)
    assert_nothing_reached(got, secrets)


# -- as an unprivileged user, through `mistol exec` ----------------------------------------
def run_as_nobody(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run `args` as nobody (setpriv), where /root shows only the interpreter (pyenv lives there).

    The private mount namespace is made here, by root, only so that nobody can start this
    test's Python at all; the sandbox then builds its own view as nobody.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody; as an ordinary user the other tests already run unprivileged")
    for tool in ("unshare", "setpriv", "mount"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    unreadable = [p for p in (ROOT, Path(sys.prefix)) if not _world_readable(p)]
    if unreadable:
        pytest.skip(f"nobody cannot read {unreadable[0]}")
    interpreter = Path(sys.base_prefix)
    setup = "exec setpriv --reuid=nobody --regid=nogroup --clear-groups \"$@\""
    if interpreter.is_relative_to("/root"):
        setup = ('d=$(mktemp -d) && mount --bind /root/.pyenv "$d" && mount -t tmpfs -o mode=755 none /root && '
                 'mkdir /root/.pyenv && mount --move "$d" /root/.pyenv && rmdir "$d" && ' + setup)
        if not str(interpreter).startswith("/root/.pyenv/"):
            pytest.skip(f"the interpreter is in {interpreter}, which nobody cannot read")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", setup, "sh", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def _world_readable(path: Path) -> bool:
    path = path.resolve()
    while True:
        if not path.stat().st_mode & 0o001:
            return False
        if path == path.parent:
            return True
        path = path.parent


@pytest.fixture
def nobody_home():
    """A home for nobody outside /tmp: a 0600 and a 0644 file, and the script to run."""
    home = Path(tempfile.mkdtemp(prefix="mistol-test-home-", dir="/home" if os.access("/home", os.W_OK) else None))
    try:
        (home / "private.txt").write_text("secret 0600")
        (home / "private.txt").chmod(0o600)
        (home / "public.txt").write_text("visible 0644")
        (home / "public.txt").chmod(0o644)
        for p in (home, home / "private.txt", home / "public.txt"):
            os.chown(p, NOBODY, NOBODY)
        home.chmod(0o755)
        yield home
    finally:
        shutil.rmtree(home)


def test_as_an_unprivileged_user_the_attacks_hold_too(nobody_home):
    if not filesystem_isolation_available():
        pytest.skip("no mount namespace here")
    sock_path = f"/tmp/mistol-test-{uuid.uuid4().hex[:8]}.sock"
    name = f"mistol-left-{uuid.uuid4().hex[:8]}"
    targets = {"files": ["/etc/shadow", str(nobody_home / "private.txt"), str(nobody_home / "public.txt")],
               "dirs": [str(nobody_home), "/home", "/root", "/proc/1/root/home"], "sockets": [sock_path]}
    leave = "\n".join(f"open({p!r}, 'w').write('x')" for p in (f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", name))
    fill = ("\nimport errno\ntry:\n    open('big', 'wb').write(b'x' * (32 << 20))\n"
            "except OSError as e:\n    print('disk:', errno.errorcode[e.errno])\n")
    script = nobody_home / "attack.py"
    script.write_text(attack_code(targets) + leave + fill + "import os\nprint('uid', os.getuid())\n")
    os.chown(script, NOBODY, NOBODY)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(nobody_home), "PYTHONPATH": str(ROOT)}
    network = [] if network_isolation_available() else ["--allow-network"]
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(sock_path)
        os.chmod(sock_path, 0o777)  # nobody could connect, were it in its view
        server.listen()
        result = run_as_nobody([sys.executable, "-m", "mistol", "exec", str(script), "--disk", "16", *network], env)
        os.unlink(sock_path)
    assert result.returncode == 0, result.stderr
    got = verdicts(result.stdout)
    assert_nothing_reached(got, targets)
    assert "disk: ENOSPC" in result.stdout and f"uid {NOBODY}" in result.stdout, result.stdout
    for place in (f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", str(nobody_home / name)):
        assert not os.path.exists(place)


# -- through the chat's code path ----------------------------------------------------------
def test_a_block_the_model_writes_in_a_chat_sees_none_of_it(secrets):
    from mistol.sandbox.code_turn import CodeOptions, CodeRunner
    from mistol.sandbox.codeblocks import CodeBlock

    notices = []
    runner = CodeRunner(CodeOptions(auto_yes=True, limits=isolated_limits()), None, notices.append)
    try:
        output = runner.handle(CodeBlock("python", attack_code(secrets)))
    finally:
        runner.close()
    assert_nothing_reached(verdicts(output), secrets)
    assert not notices  # run without a warning: the system keeps the code from the files


# -- where the kernel allows no mount namespace --------------------------------------------
def test_without_a_mount_namespace_landlock_still_keeps_the_files_and_each_block_is_asked(secrets):
    """In a user namespace whose limits allow no new namespace, as on kernels that forbid them."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a user namespace here to simulate a kernel without namespaces")
    code = f"""
import json
from mistol.sandbox.code_turn import CodeOptions, CodeRunner
from mistol.sandbox.sandbox import Sandbox, SandboxLimits, filesystem_isolation_available
print(filesystem_isolation_available())
with Sandbox(SandboxLimits(allow_network=True, timeout_s=20)) as sb:
    print(sb.isolation.filesystem)
    print(sb.run({attack_code(secrets)!r}).output, end="")
runner = CodeRunner(CodeOptions(auto_yes=True, limits=SandboxLimits(allow_network=True)), None, print)
print(runner.confirm("print(1)"))
"""
    limits = " && ".join(f"echo 0 > /proc/sys/user/max_{kind}_namespaces" for kind in ("net", "pid", "mnt"))
    result = subprocess.run(["unshare", "-U", "-r", "sh", "-c", limits + ' && exec "$0" -c "$1"', sys.executable, code],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = result.stdout.splitlines()
    assert lines[0] == "False", result.stderr
    if not lines[1].startswith("Landlock"):
        pytest.skip(f"no Landlock here either ({lines[1]})")
    got = verdicts(result.stdout)
    for path in secrets["files"]:  # forbidden by Landlock, though they exist
        assert got[path] == "PermissionError", got
    assert "no mount namespace" in result.stdout and lines[-1] == "None"  # warned, and nobody to say yes


# -- kernel objects beyond files: SysV IPC, keyrings, memory files -------------------------------
KERNEL_OBJECTS = """
import ctypes, json, os, platform
libc = ctypes.CDLL(None, use_errno=True)
got = {}
def attempt(name, call):
    ctypes.set_errno(0)
    try:
        result = call()
        got[name] = "ok" if result is not None and result >= 0 else os.strerror(ctypes.get_errno())
    except OSError as e:
        got[name] = e.strerror
HOST_KEY = %d
attempt("host shm", lambda: libc.shmget(HOST_KEY, 0, 0))
attempt("new shm", lambda: libc.shmget(HOST_KEY + 1, 1 << 20, 0o1666))
attempt("new msg queue", lambda: libc.msgget(HOST_KEY + 2, 0o1666))
attempt("memfd", lambda: os.memfd_create("x"))
keyctl = {"x86_64": 250, "aarch64": 219}.get(platform.machine())
if keyctl:  # KEYCTL_READ of the session keyring the code started with (KEY_SPEC_SESSION_KEYRING = -3)
    buf = ctypes.create_string_buffer(4096)
    attempt("session keyring", lambda: libc.syscall(ctypes.c_long(keyctl), ctypes.c_long(11), ctypes.c_long(-3), buf, ctypes.c_long(4096)))
print(json.dumps(got))
"""


def test_the_code_reaches_no_host_ipc_keyring_or_memory_file():
    """Host shared memory read by the code, segments left behind, the starter's session keys,
    and memfd files past every limit: each was possible before the IPC namespace and the filter."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x4D150000 + os.getpid() % 0xFFFF
    host_segment = libc.shmget(key, 4096, 0o1666)
    assert host_segment >= 0
    try:
        with Sandbox(isolated_limits()) as sb:
            if not sb.isolation.syscalls == "filtered":
                pytest.skip(f"no system-call filter here ({sb.isolation.syscalls})")
            got = json.loads(sb.run(KERNEL_OBJECTS % key).output)
        assert got["host shm"] != "ok" and got["new shm"] != "ok" and got["new msg queue"] != "ok", got
        assert got["memfd"] != "ok" and got.get("session keyring", "refused") != "ok", got
        assert libc.shmget(key + 1, 0, 0) == -1  # nothing was left behind on the host
    finally:
        libc.shmctl(host_segment, 0, None)  # IPC_RMID


def test_a_python_installed_under_tmp_still_runs_in_the_private_tmp():
    """The private /tmp is mounted over the host's: a venv living in /tmp (a CI checkout, say)
    must be put back on top of it, or the code cannot start its own interpreter."""
    import mistol

    base = Path(tempfile.mkdtemp(prefix="mistol-venv-", dir="/tmp"))
    try:
        subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(base / "venv")], check=True)
        script = ("from mistol.sandbox.sandbox import Sandbox, SandboxLimits\n"
                  f"with Sandbox(SandboxLimits(allow_network={not network_isolation_available()})) as sb:\n"
                  "    print(sb.isolation.filesystem)\n"
                  "    print(sb.run('import subprocess, sys\\nprint(subprocess.run([sys.executable, \"-c\", "
                  "\"print(6 * 7)\"], capture_output=True, text=True).stdout.strip())').output)\n")
        env = {**os.environ, "PYTHONPATH": str(Path(mistol.__file__).parent.parent)}
        done = subprocess.run([str(base / "venv" / "bin" / "python"), "-c", script], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        filesystem, output = done.stdout.splitlines()[:2]
        if not filesystem.startswith("private root"):
            pytest.skip(f"no mount namespace here (filesystem: {filesystem})")
        assert output == "42", done.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)
