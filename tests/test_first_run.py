"""A first run without the model: offline, every command says at once how to go on; online, a
large download is asked about first, and `tokenize` fetches only the tokenizer.

"Online" is a stand-in for the Hugging Face API on localhost that answers the listing of a
repository (file names and sizes), which is all mistol reads before deciding to download.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mistol.commands.options import DEFAULT_MODEL

REPO = "someone/big-model"
LISTING = {"config.json": 600, "tokenizer.model": 493_443, "tokenizer_config.json": 1_000,
           "model-00001-of-00002.safetensors": 9_900_000_000, "model-00002-of-00002.safetensors": 4_540_000_000,
           "model.safetensors.index.json": 24_000, "pytorch_model.bin": 14_000_000_000, "README.md": 5_000}


def mistol(*args, env, input="", timeout=60):
    return subprocess.run([sys.executable, "-m", "mistol", *args], input=input, capture_output=True, text=True,
                          env=env, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_hub(tmp_path):
    """A local stand-in for huggingface.co's API; `requests` records what was asked."""
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path.split("?")[0] == f"/api/models/{REPO}":
                body = json.dumps({"id": REPO, "sha": "0" * 40,
                                   "siblings": [{"rfilename": f, "size": n} for f, n in LISTING.items()]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
            else:
                body = b'{"error": "not here"}'
                self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    yield env, requests
    server.shutdown()


@pytest.mark.parametrize("command", [["chat"], ["tokenize", "hi"], ["serve", "-m", REPO], ["voice", "--input", "x.wav"],
                                     ["generate", "-m", REPO, "-p", "hi"], ["math", "1+1"],
                                     # each agent its own model: the default one is not needed
                                     ["duo", "--model-a", REPO, "--model-b", "demo", "--a", "A", "--b", "B", "--topic", "t"]])
def test_offline_every_command_names_the_ways_out_at_once(command, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    env.pop("HF_HUB_OFFLINE", None)
    out = mistol(*command, env=env, timeout=30)
    assert out.returncode == 1, out.stderr
    (line,) = out.stderr.strip().splitlines()
    repo = REPO if REPO in command else DEFAULT_MODEL
    assert line.startswith(f"mistol: error: {repo}: could not download"), line
    assert "--model demo" in line and f"hf download {repo}" in line and "--model DIR" in line


def test_every_help_lists_the_demo_model():
    for command in ("chat", "generate", "duo", "serve", "math", "voice", "tokenize"):
        out = subprocess.run([sys.executable, "-m", "mistol", command, "--help"], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "200"})
        assert "demo (a tiny arithmetic model" in out.stdout, command


def test_a_large_download_is_not_started_without_a_yes(fake_hub):
    env, requests = fake_hub
    out = mistol("generate", "-m", REPO, "-p", "hi", env=env)  # stdin is not a terminal: nobody to ask
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert "14.4 GB" in line and "Pass --download" in line and "--model demo" in line, line
    assert not any("/resolve/" in r for r in requests)


def test_the_person_is_asked_and_no_means_no(fake_hub):
    pexpect = pytest.importorskip("pexpect")
    env, requests = fake_hub
    child = pexpect.spawn(sys.executable, ["-m", "mistol", "chat", "-m", REPO], env=env, encoding="utf-8", timeout=60)
    child.expect(r"14\.4 GB from Hugging Face into .*Download it now\? \[y/N\] ")
    child.sendline("n")
    child.expect("not downloaded")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert not any("/resolve/" in r or "/revision/" in r for r in requests)


def test_download_flag_goes_ahead_without_asking(fake_hub):
    env, requests = fake_hub
    out = mistol("generate", "-m", REPO, "-p", "hi", "--download", env=env)
    assert "14.4 GB" in out.stderr and "downloading" in out.stderr
    # The stand-in has no files to give: what matters is that the download began.
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith(f"mistol: error: {REPO}: could not")
    assert any("/revision/" in r or "/resolve/" in r for r in requests), requests


def test_tokenize_asks_for_the_tokenizer_files_only(fake_hub):
    env, requests = fake_hub
    out = mistol("tokenize", "-m", REPO, "hi", env=env)
    assert "Download it now" not in out.stderr and "Pass --download" not in out.stderr
    assert out.returncode == 1 and any("/revision/" in r for r in requests)  # it went ahead, without asking
    assert not any(".safetensors" in r or ".bin" in r for r in requests), requests
