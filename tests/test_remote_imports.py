"""A client of a remote server (`chat --api URL`) runs without torch: it starts fast and
works where torch is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CODE = """
import sys
import mistol.llm, mistol.remote
from mistol.generation import Generation
from mistol.sampling import SamplingParams
llm = mistol.remote.OpenAICompatibleLLM("http://127.0.0.1:9", model="m")
SamplingParams(temperature=0, stop=["x"])
assert Generation().tokens_per_second == 0.0
print("torch" in sys.modules)
"""


def test_the_remote_path_does_not_import_torch():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
