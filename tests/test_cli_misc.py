"""Command-line behaviours: tokenize, saving and loading chats, offline downloads, dtypes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mistol.chat.log import replay


def run(*args, input=None, env=None, check=True):
    return subprocess.run([sys.executable, "-m", "mistol", *args], input=input, capture_output=True,
                          text=True, env=env, timeout=300, check=check)


@pytest.mark.slow
def test_tokenize_matches_the_reference(mistral_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(mistral_dir)
    text = "<|im_start|>user\nHello,  wörld! 😃 <|im_end|>"
    special = json.loads(run("tokenize", "--model", str(mistral_dir), "--special", text).stdout)
    assert special == ref.encode(text)
    plain = json.loads(run("tokenize", "--model", str(mistral_dir), text).stdout)
    assert 32001 not in plain and plain == ref.encode(text, split_special_tokens=True)


def test_save_and_load_in_the_chat(mistral_dir, tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    saved = tmp_path / "conv.json"
    script = f"first message\n/save {saved}\n/reset\n/load {saved}\nsecond message\n"
    run("chat", "--model", str(mistral_dir), "--max-tokens", "4", "-t", "0", input=script, env=env)
    conv = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]
    (log,) = (tmp_path / "data" / "mistol" / "chats").glob("*.jsonl")
    messages = replay(log)
    assert [m["content"] for m in messages[:2]] == [conv[0]["content"], "first message"]
    assert messages[3]["content"] == "second message" and len(messages) == 5


def test_unreachable_hub_model_gives_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = run("generate", "--model", "someone/not-downloaded", "-p", "hi", env=env, check=False)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("mistol: error: someone/not-downloaded: could not download") and "--model DIR" in line


def test_bfloat16_and_float16_track_float32(mistral_dir):
    from mistol.engine import Engine

    tokens = list(range(100, 140))
    ref = Engine.load(mistral_dir, dtype="f32").new_session().feed(tokens, all_logits=True)
    for dtype in ("bf16", "f16"):
        logits = Engine.load(mistral_dir, dtype=dtype).new_session().feed(tokens, all_logits=True)
        assert logits.dtype == torch.float32
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
        assert agree >= 0.9, (dtype, agree)


def hostile_chat_files(d):
    """Files /load (or --resume) used to crash on, or to load as an empty conversation."""
    (d / "delta-first.jsonl").write_text('{"event": "delta", "content": "x"}\n{"event": "undo"}\n')
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "deep-line.jsonl").write_text('{"event": "reset"}\n' + "[" * 100_000 + "]" * 100_000 + "\n{}\n")
    (d / "not-utf8.jsonl").write_bytes(b"\xff\xfe\x00\x80garbage\n\xc3(\n")
    (d / "garbage.txt").write_text("just one line of garbage")
    (d / "wrong-types.json").write_text('{"messages": [{"role": 5, "content": []}]}')
    (d / "messages-string.json").write_text('{"messages": "hello"}')
    (d / "bad-role.jsonl").write_text('{"event": "message", "role": "wizard", "content": "x"}\n{"event": "undo"}\n')
    (d / "a-directory").mkdir()
    return sorted(p.name for p in d.iterdir())


def test_malformed_chat_files_are_one_clear_error(tmp_path):
    from mistol.errors import MistolError

    for name in hostile_chat_files(tmp_path) + ["missing.json", "nul\0name"]:
        with pytest.raises(MistolError) as e:
            replay(tmp_path / name)
        assert "\n" not in str(e.value) and len(str(e.value)) < 300, name


def test_a_lone_surrogate_in_a_log_is_replaced_on_load_and_on_resume(mistral_dir, tmp_path):
    chats = tmp_path / "data" / "mistol" / "chats"
    chats.mkdir(parents=True)
    log = chats / "2020-01-01T00-00-00.jsonl"
    log.write_text('{"event": "system", "content": "sys"}\n'
                   '{"event": "message", "role": "user", "content": "PIN \\ud800"}\n'
                   '{"event": "message", "role": "assistant", "content": "ok \\udfff"}\n')
    assert replay(log)[1:] == [{"role": "user", "content": "PIN \ufffd"}, {"role": "assistant", "content": "ok \ufffd"}]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    out = run("chat", "--model", str(mistral_dir), "--max-tokens", "3", "-t", "0", "--resume", "--no-code",
              input="and again\n", env=env, check=False)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    messages = replay(log)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "PIN \ufffd" and messages[3]["content"] == "and again"


def test_load_and_save_errors_keep_the_piped_chat_going(mistral_dir, tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    files = tmp_path / "files"
    files.mkdir()
    names = hostile_chat_files(files) + ["missing.json"]
    (files / "empty.json").write_text('{"messages": []}')
    (files / "empty.jsonl").write_text("")
    good = tmp_path / "good.json"
    script = "first message\n" + "".join(f"/load {files / n}\n" for n in names)
    script += f"/load {files / 'empty.json'}\n/load {files / 'empty.jsonl'}\n"
    script += f"/save {files / 'a-directory'}\n/save {tmp_path / 'no' / 'such' / 'dir.json'}\n"
    script += f"second message\n/save {good}\n"
    out = run("chat", "--model", str(mistral_dir), "--max-tokens", "3", "-t", "0", "--no-code", input=script,
              env=env, check=False)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    notices = out.stderr.splitlines()
    assert sum(line.startswith("not loaded: ") for line in notices) == len(names) + 2, out.stderr
    assert sum("would wipe this one (2 message(s) and the system prompt)" in line for line in notices) == 2
    assert sum(line.startswith("not saved: ") for line in notices) == 2, out.stderr
    conv = json.loads(good.read_text())["messages"]
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant"]
    assert conv[1]["content"] == "first message" and conv[3]["content"] == "second message"


def test_threads_from_the_option_or_the_environment(tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    ask = ["chat", "--model", "demo", "--no-code", "--max-tokens", "2", "-t", "0", "-v"]
    assert "mistol: 1 thread (--threads)" in run(*ask, "--threads", "1", input="hi\n", env=env).stderr
    assert "mistol: 1 thread (MISTOL_THREADS)" in run(*ask, input="hi\n", env={**env, "MISTOL_THREADS": "1"}).stderr
    bad = run(*ask, "--threads", "0", input="hi\n", env=env, check=False)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == "mistol: error: --threads 0: expected 1 or more"
    bad = run(*ask, input="hi\n", env={**env, "MISTOL_THREADS": "many"}, check=False)
    assert bad.returncode == 1 and "MISTOL_THREADS='many'" in bad.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs and Linux affinity")
def test_default_threads_leave_a_busy_core_alone(tmp_path):
    """With another process keeping one of its two cores busy, the model runs on one thread
    (two would wait at every barrier for the thread that shares the busy core)."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, preexec_fn=lambda: os.sched_setaffinity(0, {cpus[1]}))
    try:
        time.sleep(0.2)
        out = subprocess.run(
            [sys.executable, "-m", "mistol", "chat", "--model", "demo", "--no-code", "--max-tokens", "2", "-v"],
            input="hi\n", capture_output=True, text=True, timeout=120, env={**os.environ, "XDG_DATA_HOME": str(tmp_path)},
            preexec_fn=lambda: os.sched_setaffinity(0, set(cpus)))
    finally:
        hog.kill()
        hog.wait()
    assert out.returncode == 0, out.stderr
    assert "mistol: 1 thread (1 of 2 cores: " in out.stderr, out.stderr


@pytest.mark.parametrize("command", [["chat"], ["duo", "--a", "a student", "--b", "a tutor", "--topic", "sums"]])
def test_a_data_directory_that_cannot_be_written_is_one_line_naming_the_fix(mistral_dir, tmp_path, command):
    """A home that is not the person's to write (a service account's, a container's): one line
    saying where the chat could not be kept and how to choose another place, before anything
    is typed; never a traceback. (A file in the way stands for a read-only home, even for root.)"""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    env = {**os.environ, "XDG_DATA_HOME": str(blocked / "data")}
    out = run(*command, "--model", str(mistral_dir), "--max-tokens", "3", input="hello\n", env=env, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert f"cannot keep the chat in {blocked / 'data' / 'mistol'}" in line and "set XDG_DATA_HOME" in line


def test_a_bench_cache_that_cannot_be_written_is_one_line_before_measuring(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    out = run("bench", "--shape", "tiny", "--cache-dir", str(blocked / "bench"), check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert f"cannot write the benchmark's model files in {blocked / 'bench'}" in line and "--cache-dir" in line
    env = {**os.environ, "XDG_CACHE_HOME": str(blocked)}  # the default place, under an unwritable cache home
    out = run("bench", "--shape", "tiny", env=env, check=False)
    assert out.returncode == 1 and "XDG_CACHE_HOME" in out.stderr and "Traceback" not in out.stderr


def test_a_chat_log_that_stops_fitting_on_the_disk_is_said_once_and_the_chat_goes_on(mistral_dir, tmp_path):
    """The disk fills mid-chat (a file-size limit: writes past it fail as on a full disk): one
    line says so, every message still gets its reply, and the log keeps the whole events before."""
    import resource

    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "-m", "mistol", "chat", "--model", str(mistral_dir), "--max-tokens", "3",
                          "-t", "0", "--no-code", "--verbose"],
                         input="".join(f"{n} message {'.' * 600}\n" for n in ("first", "second", "third")),
                         capture_output=True, text=True, env=env,
                         timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500)))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    notices = [line for line in out.stderr.splitlines() if "no longer saved to" in line]
    assert len(notices) == 1 and "File too large" in notices[0] and "/save FILE" in notices[0], out.stderr
    assert out.stderr.count("tok/s") == 3  # (--verbose) each of the three messages was answered
    (log,) = (tmp_path / "data" / "mistol" / "chats").glob("*.jsonl")
    assert log.stat().st_size <= 1500
    messages = replay(log)
    assert messages[0]["role"] == "system" and messages[1]["content"].startswith("first message")
    assert len(messages) < 7  # (the third message and its reply are not in it)
    # With room again, the chat resumes, twice: the line the full disk cut short (which reading
    # drops) is not left between the events appended after it.
    assert not log.read_text().endswith("\n")
    for again in ("again", "and again"):
        out = run("chat", "--model", str(mistral_dir), "--max-tokens", "3", "-t", "0", "--no-code", "--resume",
                  input=f"{again}\n", env=env, check=False)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    resumed = replay(log)
    assert resumed[:len(messages)] == messages and [m["content"] for m in resumed if m["role"] == "user"][-2:] == [
        "again", "and again"]


def test_a_message_too_long_for_the_context_is_said_and_the_chat_goes_on(mistral_dir, tmp_path):
    """One message longer than the whole context: one line says so and how to fix it, the
    messages after it are answered, and a piped chat exits 1 (a reply is missing)."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    script = "a short one\n" + "word " * 200 + "\nanother short one\n"
    out = run("chat", "--model", str(mistral_dir), "--ctx", "64", "--max-tokens", "3", "-t", "0", "--no-code",
              "--verbose", input=script, env=env, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "exceeds the context of 64 tokens: shorten the prompt" in errors[0], out.stderr
    assert out.stderr.count("tok/s") == 2  # (--verbose) the two short messages were answered
    (log,) = (tmp_path / "data" / "mistol" / "chats").glob("*.jsonl")
    users = [m["content"] for m in replay(log) if m["role"] == "user"]
    assert users == ["a short one", "another short one"]  # the long one is not in the conversation
