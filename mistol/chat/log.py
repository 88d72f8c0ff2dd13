"""Chats saved as they happen: one JSON event per line, flushed at once.

Events: {"event": "message", "role", "content"} adds a message (an assistant's with its
"tool_calls", a "tool" result with its "tool_call_id" and "name"); {"event": "delta",
"content"} extends the last message (a reply is written while it streams, so a crash
loses nothing already shown); {"event": "undo"} drops the last exchange; {"event":
"reset"} clears all but the system prompt; {"event": "system", "content"} sets it;
{"event": "replace", "messages"} puts a loaded conversation in place; {"event": "edit",
"content"} sets the last message's text (the person edited the code that ran).
Replaying the events rebuilds the conversation.

Reading is defensive, since a log may be damaged or a /load may name any file: a malformed
file is one clear `MistolError`, never a traceback; a line cut short by a crash at the end
is dropped; a byte that is not UTF-8, or a lone surrogate (which JSON can spell and UTF-8
cannot hold), becomes U+FFFD so that the chat can still be resumed and sent to a model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..errors import MistolError
from ..util import end_the_last_line, private_dir, write_fully

ROLES = ("system", "user", "assistant", "tool")  # "tool": a result of a call (mistol chat --tools)
MAX_FILE_BYTES = 64 << 20  # a chat is text; /load of a device or a huge file stops here


class _BadEvent(ValueError):
    """A log line that parses as JSON but is not an event this conversation can apply."""


def clean_text(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD (a pair stays one character)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "mistol"


def chats_dir() -> Path:
    return data_dir() / "chats"


class ChatLog:
    def __init__(self, path: Path, going_on: str = "the chat goes on; /save FILE keeps it elsewhere"):
        self.path = Path(path)
        self.going_on = going_on  # said if the log cannot be written: what the person still has
        try:
            private_dir(self.path.parent)
            # What was said is the person's own: readable by them only (directory 0700, file 0600).
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            end_the_last_line(self._fd)  # (reading drops a last line cut short, but only a last one)
        except OSError as e:  # a home that is not theirs to write (a service account's, a container's)
            raise MistolError(f"cannot keep the chat in {self.path.parent}: {e.strerror or e} "
                              "(set XDG_DATA_HOME to a directory you can write)") from None

    @classmethod
    def create(cls, directory: Path | None = None, **options) -> "ChatLog":
        directory = directory or chats_dir()
        stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
        path = directory / f"{stamp}.jsonl"
        n = 1
        while path.exists():
            n += 1
            path = directory / f"{stamp}-{n}.jsonl"
        return cls(path, **options)

    def write(self, event: str, **fields) -> None:
        """Append one event, on disk at once (one unbuffered write). A log that cannot be
        written (a full disk) stops there, said once: the chat goes on, and the file keeps the
        whole events before it (a line cut short at its end is dropped on reading)."""
        if self._fd is None:
            return
        data = (clean_text(json.dumps({"event": event, **fields}, ensure_ascii=False)) + "\n").encode("utf-8")
        try:
            write_fully(self._fd, data)
        except OSError as e:
            self.close()
            print(f"mistol: no longer saved to {self.path}: {e.strerror or e} ({self.going_on})",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def latest_chat(directory: Path | None = None) -> Path:
    directory = directory or chats_dir()
    logs = sorted(directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime) if directory.is_dir() else []
    if not logs:
        raise MistolError(f"no saved chat to resume in {directory}")
    return logs[-1]


def replay(path: Path) -> list[dict]:
    """The conversation a log file (or a /save file) describes; MistolError if it is neither."""
    text = _read_text(Path(path))
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):
        whole = None
    if isinstance(whole, dict) and "messages" in whole:
        return _messages_file(path, whole)
    messages: list[dict] = []
    lines = text.splitlines()
    applied = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            apply_event(messages, json.loads(line))
            applied += 1
        except (ValueError, RecursionError):  # not JSON, too deep, or not an event we can apply
            if n == len(lines) and applied:
                break  # a line cut short by a crash: everything before it stands
            raise MistolError(f"{path}:{n}: not a chat log line (nor is the file a chat saved with /save)") from None
    return messages


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise MistolError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:  # a NUL in the name
        raise MistolError(f"{path!r}: not a usable file name ({e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise MistolError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MB: not a chat")
    return data.decode("utf-8", "replace")


def apply_event(messages: list[dict], event: dict) -> None:
    """Apply one log event; _BadEvent (a ValueError) if it is malformed or does not fit."""
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise _BadEvent("not an event")
    kind = event["event"]
    if kind == "message":
        messages.append(_message(event))
    elif kind == "delta":
        if not messages:
            raise _BadEvent("a delta before any message")
        messages[-1]["content"] += _text(event.get("content"))
    elif kind == "edit":
        if not messages:
            raise _BadEvent("an edit before any message")
        messages[-1]["content"] = _text(event.get("content"))
    elif kind == "undo":
        drop_last_exchange(messages)
    elif kind == "reset":
        messages[:] = [m for m in messages[:1] if m["role"] == "system"]
    elif kind == "system":
        set_system(messages, _text(event.get("content")))
    elif kind == "replace":
        if not isinstance(event.get("messages"), list):
            raise _BadEvent("replace needs a list of messages")
        messages[:] = [_message(m) for m in event["messages"]]


def _message(m) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise _BadEvent("a message needs a role: system, user, assistant or tool")
    message = {"role": m["role"], "content": _text(m.get("content"))}
    if m["role"] == "assistant" and m.get("tool_calls"):
        calls = m["tool_calls"]
        if not isinstance(calls, list) or not all(_is_call(c) for c in calls):
            raise _BadEvent("tool_calls must be a list of {id, type, function: {name, arguments}}")
        message["tool_calls"] = calls
    if m["role"] == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
    return message


def _is_call(call) -> bool:
    fn = call.get("function") if isinstance(call, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)


def _text(value) -> str:
    if not isinstance(value, str):
        raise _BadEvent("content must be text")
    return clean_text(value)


def drop_last_exchange(messages: list[dict]) -> bool:
    """Remove the last user message and everything after it."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            del messages[i:]
            return True
    return False


def set_system(messages: list[dict], content: str) -> None:
    if messages and messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": content}
    else:
        messages.insert(0, {"role": "system", "content": content})


def save_messages(path: Path, messages: list[dict]) -> None:
    text = clean_text(json.dumps({"messages": messages}, ensure_ascii=False, indent=1))
    try:
        Path(path).write_text(text + "\n", encoding="utf-8")
    except OSError as e:
        raise MistolError(f"{path}: cannot write ({e.strerror or e})") from None
    except ValueError as e:  # a NUL in the name
        raise MistolError(f"{path!r}: not a usable file name ({e})") from None


def _messages_file(path, saved: dict) -> list[dict]:
    if not isinstance(saved["messages"], list):
        raise MistolError(f"{path}: not a saved chat (messages is not a list)")
    try:
        return [_message(m) for m in saved["messages"]]
    except _BadEvent as e:
        raise MistolError(f"{path}: not a saved chat ({e})") from None
