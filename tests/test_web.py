"""The chat page of `mistol serve`, driven in headless Chromium (Debian's chromium and
chromium-driver) through Selenium, against real servers on loopback: the demo model with
--allow-code, and a tiny random model (which rarely stops, for Stop) without it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from helpers import LoopbackServer  # noqa: E402
from mistol.sandbox.code_turn import CODE_SYSTEM_PROMPT  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
XSS = '<img src=x onerror="window.__pwned = 1"> and [click me](javascript:window.__pwned=2) <script>window.__pwned=3</script>'

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)",
                allow_module_level=True)


def start_server(model, **options):
    from mistol.engine import Engine
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(model, dtype="f32")
    app = create_app(engine, ServerOptions(model_name="test-model", max_batch=2, **options))
    return engine, LoopbackServer(app)


@pytest.fixture(scope="module")
def code_server():
    """The demo model (it answers arithmetic with Python) with Run buttons."""
    engine, server = start_server("demo", allow_code=True)
    with server as url:
        yield SimpleNamespace(url=url, engine=engine, token=server.app.state.server.run_token)


@pytest.fixture(scope="module")
def plain_server(mistral_dir):
    """A random tiny model: it writes until max_tokens, so there is time to press Stop."""
    engine, server = start_server(mistral_dir, max_context=4096)
    with server as url:
        yield SimpleNamespace(url=url, engine=engine)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1280,900"]:
        options.add_argument(flag)
    downloads = tmp_path_factory.mktemp("downloads")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.downloads = downloads
    yield browser
    browser.quit()


def open_page(driver, url, conversations=None, settings=None, token=None):
    """Load the page with a clean (or given) localStorage and wait until it knows the server;
    with `token`, through the address `mistol serve --allow-code` prints (/?token=...)."""
    driver.get(url + "/static/icon.svg")  # same origin: localStorage can be set before the app starts
    driver.execute_script("localStorage.clear(); sessionStorage.clear();")
    if conversations is not None:
        driver.execute_script("localStorage.setItem('mistol.conversations.v1', arguments[0]);", json.dumps(conversations))
    if settings is not None:
        driver.execute_script("localStorage.setItem('mistol.settings.v1', arguments[0]);", json.dumps(settings))
    driver.get(url + "/" + (f"?token={token}" if token else ""))
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def wait(driver, condition, timeout=30):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def idle(driver) -> bool:
    return driver.find_element(By.ID, "send").is_displayed()


def messages(driver) -> list[tuple[str, str]]:
    """(role, shown text) of each message, read in one go (the page re-renders as text streams)."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#messages .message')].map("
        "n => [n.classList[1], n.querySelector('.content').innerText]);")
    return [tuple(row) for row in rows]


def stored(driver) -> list[dict]:
    return json.loads(driver.execute_script("return localStorage.getItem('mistol.conversations.v1')") or "[]")


def type_message(driver, text):
    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


GREEDY = {"temperature": 0, "top_p": 1, "max_tokens": 200, "system": "", "apiKey": ""}


def api_reply(url, messages, max_tokens=200) -> str:
    r = httpx.post(url + "/v1/chat/completions", json={"model": "test-model", "messages": messages,
                                                       "temperature": 0, "max_tokens": max_tokens}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


# -- chatting ---------------------------------------------------------------------------------
def test_send_shows_the_streamed_reply_and_keeps_the_conversation(driver, plain_server):
    open_page(driver, plain_server.url, settings={**GREEDY, "max_tokens": 24})
    type_message(driver, "Hello there")
    wait(driver, lambda d: len(messages(d)) == 2 and idle(d))
    (role_u, user), (role_a, reply) = messages(driver)
    assert (role_u, user) == ("user", "Hello there")
    # The same request through the API, greedy: the page showed exactly the model's reply.
    expected = api_reply(plain_server.url, [{"role": "user", "content": "Hello there"}], max_tokens=24)
    assert stored(driver)[0]["messages"][1]["content"] == expected
    assert reply.strip() and role_a == "assistant"
    meta = driver.find_element(By.CSS_SELECTOR, ".message.assistant .meta").text
    assert "24 tokens" in meta and "tok/s" in meta and "first token" in meta, meta
    # Kept in the browser and listed in the sidebar.
    assert driver.find_element(By.CSS_SELECTOR, "#conversations li .title").text == "Hello there"
    driver.refresh()
    wait(driver, lambda d: len(messages(d)) == 2)
    assert messages(driver)[0][1] == "Hello there"


def test_shift_enter_is_a_new_line_and_escape_stops(driver, plain_server):
    open_page(driver, plain_server.url, settings={**GREEDY, "max_tokens": 3000})
    box = driver.find_element(By.ID, "input")
    box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert box.get_attribute("value") == "first line\nsecond line"
    assert messages(driver) == []  # nothing sent yet
    box.send_keys(Keys.ENTER)
    wait(driver, lambda d: len(messages(d)) == 2 and len(messages(d)[1][1]) > 20)
    assert driver.find_element(By.ID, "stop").is_displayed()
    box.send_keys(Keys.ESCAPE)
    wait(driver, idle, timeout=10)
    # The server let go of the request: no active slot (it frees within one decode step).
    deadline = time.monotonic() + 10
    while httpx.get(plain_server.url + "/health").json()["active"] != 0:
        assert time.monotonic() < deadline, "the stopped request still holds a slot"
        time.sleep(0.05)
    text = stored(driver)[0]["messages"][1]["content"]
    assert 0 < len(text)
    time.sleep(0.5)
    assert stored(driver)[0]["messages"][1]["content"] == text  # nothing more arrives
    assert messages(driver)[0][1] == "first line\nsecond line"


def test_stop_button_cancels_generation(driver, plain_server):
    open_page(driver, plain_server.url, settings={**GREEDY, "max_tokens": 3000})
    type_message(driver, "Write a very long story")
    wait(driver, lambda d: len(messages(d)) == 2 and len(messages(d)[1][1]) > 20)
    before = httpx.get(plain_server.url + "/health").json()
    assert before["active"] == 1
    driver.find_element(By.ID, "stop").click()
    wait(driver, idle, timeout=10)
    deadline = time.monotonic() + 10
    while httpx.get(plain_server.url + "/health").json()["active"] != 0:
        assert time.monotonic() < deadline, "the stopped request still holds a slot"
        time.sleep(0.05)
    tokens = int(driver.find_element(By.CSS_SELECTOR, ".message.assistant .meta").text.split()[0])
    assert 0 < tokens < 3000


def test_regenerate_and_edit(driver, code_server):
    open_page(driver, code_server.url, settings=GREEDY)
    type_message(driver, "What is 2 + 3?")
    wait(driver, lambda d: len(messages(d)) == 2 and idle(d))
    first = stored(driver)[0]["messages"][1]["content"]
    driver.find_element(By.CSS_SELECTOR, ".message.assistant .regenerate").click()
    # Waiting for the whole reply, not just for any text: the page may look idle for a moment
    # before the regenerated stream starts, and mid-stream it holds only part of the reply.
    wait(driver, lambda d: idle(d) and stored(d)[0]["messages"][1]["content"] == first)  # greedy: the same again
    assert len(stored(driver)[0]["messages"]) == 2

    # With --allow-code and no system prompt of its own, the page uses the code-mode one.
    expected = api_reply(code_server.url, [{"role": "system", "content": CODE_SYSTEM_PROMPT},
                                           {"role": "user", "content": "Hi!"}])
    driver.find_element(By.CSS_SELECTOR, ".message.user .edit").click()
    box = driver.find_element(By.CSS_SELECTOR, ".message.user .edit-box")
    box.clear()
    box.send_keys("Hi!", Keys.ENTER)
    wait(driver, lambda d: idle(d) and [m["content"] for m in stored(d)[0]["messages"]] == ["Hi!", expected])


def test_system_prompt_and_sampling_settings_reach_the_server(driver, code_server):
    open_page(driver, code_server.url, settings=GREEDY)
    driver.find_element(By.ID, "toggle-settings").click()
    system = driver.find_element(By.ID, "system-prompt")
    system.send_keys("You are terse.")
    tokens = driver.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("5")
    type_message(driver, "What is 12 * 12?")
    wait(driver, lambda d: len(messages(d)) == 2 and idle(d))
    reply = stored(driver)[0]["messages"][1]["content"]
    expected = api_reply(code_server.url, [{"role": "system", "content": "You are terse."},
                                           {"role": "user", "content": "What is 12 * 12?"}], max_tokens=5)
    assert reply == expected
    assert driver.find_element(By.CSS_SELECTOR, ".message.assistant .meta").text.startswith("5 tokens")
    assert json.loads(driver.execute_script("return localStorage.getItem('mistol.settings.v1')"))["system"] == \
        "You are terse."


# -- untrusted output ---------------------------------------------------------------------------
def conversation_with(reply: str, question: str = "Say something") -> list[dict]:
    return [{"id": "c1", "title": "stored", "created": 0, "updated": 0,
             "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}]


def test_html_and_javascript_links_in_a_reply_are_shown_not_run(driver, plain_server):
    reply = f"Here you go: {XSS}\n\n**bold** and a [good link](https://example.org)"
    open_page(driver, plain_server.url, conversations=conversation_with(reply))
    content = driver.find_element(By.CSS_SELECTOR, ".message.assistant .content")
    text = content.text
    assert '<img src=x onerror="window.__pwned = 1">' in text
    assert "[click me](javascript:window.__pwned=2)" in text
    assert "<script>window.__pwned=3</script>" in text
    assert content.find_elements(By.CSS_SELECTOR, "img, script") == []
    links = content.find_elements(By.TAG_NAME, "a")
    assert [a.get_attribute("href") for a in links] == ["https://example.org/"]
    assert content.find_element(By.TAG_NAME, "strong").text == "bold"
    time.sleep(0.3)
    assert driver.execute_script("return window.__pwned") is None
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


def test_the_page_forbids_inline_script(plain_server):
    r = httpx.get(plain_server.url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    policy = r.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert httpx.get(plain_server.url + "/static/app.js").status_code == 200
    assert httpx.get(plain_server.url + "/static/..%2Fapp.py").status_code == 404


def test_code_blocks_are_highlighted(driver, plain_server):
    reply = "```python\nimport math\nprint(math.pi)  # pi\n```"
    open_page(driver, plain_server.url, conversations=conversation_with(reply))
    block = driver.find_element(By.CSS_SELECTOR, ".code-block")
    assert block.find_element(By.CSS_SELECTOR, ".code-language").text == "python"
    assert [s.text for s in block.find_elements(By.CSS_SELECTOR, ".tok-keyword")][:1] == ["import"]
    assert block.find_element(By.CSS_SELECTOR, ".tok-comment").text == "# pi"


# -- running code -------------------------------------------------------------------------------
def test_without_allow_code_there_is_no_run_button_and_no_endpoint(driver, plain_server):
    open_page(driver, plain_server.url, conversations=conversation_with("```python\nprint(1 + 1)\n```"))
    assert driver.find_elements(By.CSS_SELECTOR, ".code-block")
    assert driver.find_elements(By.CSS_SELECTOR, ".run-code") == []
    r = httpx.post(plain_server.url + "/api/run", json={"code": "print(1)"},
                   headers={"Origin": plain_server.url})
    assert r.status_code == 404
    assert httpx.get(plain_server.url + "/api/config").json()["allow_code"] is False


def test_run_asks_first_then_shows_the_output_and_the_model_goes_on(driver, code_server):
    open_page(driver, code_server.url, settings=GREEDY, token=code_server.token)
    # the token is kept for this tab and gone from the address bar
    assert driver.current_url == code_server.url + "/"
    assert driver.execute_script("return sessionStorage.getItem('mistol.runToken')") == code_server.token
    assert not driver.find_element(By.ID, "notice").is_displayed()
    type_message(driver, "What is 1234 + 4321?")
    try:
        run = wait(driver, lambda d: idle(d) and d.find_elements(By.CSS_SELECTOR, ".run-code"))[0]
    except Exception:
        print(stored(driver), driver.get_log("browser"))
        raise
    reply = stored(driver)[0]["messages"][1]["content"]
    assert reply.rstrip().endswith("```") and "1234 + 4321" in reply  # paused at the closed block

    run.click()  # asks first; Cancel runs nothing
    dialog = driver.find_element(By.ID, "run-dialog")
    assert dialog.is_displayed() and "1234 + 4321" in driver.find_element(By.ID, "run-dialog-code").text
    driver.find_element(By.ID, "run-cancel").click()
    assert not dialog.is_displayed()
    assert stored(driver)[0]["messages"][1]["content"] == reply

    driver.find_element(By.CSS_SELECTOR, ".run-code").click()
    driver.find_element(By.ID, "run-confirm").click()
    wait(driver, lambda d: idle(d) and "Output:" in stored(d)[0]["messages"][1]["content"]
         and not d.find_elements(By.CSS_SELECTOR, ".run-code"))
    final = stored(driver)[0]["messages"][1]["content"]
    assert "Output:\n```\n5555\n```" in final
    after = final.split("Output:\n```\n5555\n```", 1)[1]
    assert "5555" in after  # the model read the output and answered with it
    assert "5555" in messages(driver)[1][1]


def test_run_endpoint_checks_origin_and_host(code_server):
    url, token = code_server.url, {"X-Mistol-Run-Token": code_server.token}
    ok = httpx.post(url + "/api/run", json={"code": "print(6 * 7)", "conversation": "t"},
                    headers={"Origin": url, **token})
    assert ok.status_code == 200 and ok.json()["output"] == "42\n" and ok.json()["feedback"].startswith("\nOutput:")
    for headers in [{}, {"Origin": "http://evil.example"}, {"Origin": "null"}, token, {"Origin": "null", **token}]:
        r = httpx.post(url + "/api/run", json={"code": "print(1)"}, headers=headers)
        assert r.status_code == 403, (headers, r.text)
    # DNS rebinding: a foreign name pointing at 127.0.0.1 (Origin and Host agree, but are not loopback).
    r = httpx.post(url + "/api/run", json={"code": "print(1)"},
                   headers={"Host": "evil.example", "Origin": "http://evil.example", **token})
    assert r.status_code == 403
    # A cross-site form post (text/plain) cannot run code either.
    r = httpx.post(url + "/api/run", content='{"code": "print(1)"}',
                   headers={"Origin": url, "Content-Type": "text/plain", **token})
    assert r.status_code == 415


def test_run_endpoint_needs_the_token_of_this_start_even_on_loopback(code_server):
    """Another account on this machine reaches loopback too, and can send any Origin it likes
    (curl -H 'Origin: http://127.0.0.1:PORT'): without the token printed at start, no run."""
    url = code_server.url
    marker = "print('ran')"
    for token in [None, "", "wrong", code_server.token[:-1], code_server.token + "x", code_server.token.upper()]:
        headers = {"Origin": url} | ({"X-Mistol-Run-Token": token} if token is not None else {})
        r = httpx.post(url + "/api/run", json={"code": marker, "conversation": "curl"}, headers=headers)
        assert r.status_code == 403, (token, r.text)
        assert "run token" in r.json()["error"]["message"] and "ran" not in r.text
    r = httpx.post(url + "/api/run", json={"code": marker, "conversation": "curl"}, params={"token": code_server.token},
                   headers={"Origin": url})
    assert r.status_code == 403  # only the header counts: a token in a URL is not enough
    # the token is not handed out by the server to whoever asks
    assert code_server.token not in httpx.get(url + "/api/config").text
    assert code_server.token not in httpx.get(url + "/").text
    assert code_server.token not in httpx.get(url + "/static/app.js").text


def test_a_forged_status_message_through_the_server_is_a_note_and_the_conversation_goes_on(code_server):
    url, headers = code_server.url, {"Origin": code_server.url, "X-Mistol-Run-Token": code_server.token}
    forged = ("import os\nfor fd in range(3, 64):\n"
              "    try: os.write(fd, b'\\0\\0\\0\\x09{not json')\n    except OSError: pass")
    r = httpx.post(url + "/api/run", json={"code": forged, "conversation": "forged"}, headers=headers, timeout=60)
    assert r.status_code == 200 and "SandboxError" in r.json()["output"] and r.json()["ok"] is False
    r = httpx.post(url + "/api/run", json={"code": "print(6 * 7)", "conversation": "forged"}, headers=headers,
                   timeout=60)
    assert r.status_code == 200 and r.json()["output"] == "42\n"


def test_a_page_opened_without_the_token_says_how_to_run_code_and_runs_nothing(driver, code_server):
    open_page(driver, code_server.url, settings=GREEDY)
    assert "?token=" in driver.find_element(By.ID, "notice").text
    type_message(driver, "What is 1234 + 4321?")
    run = wait(driver, lambda d: idle(d) and d.find_elements(By.CSS_SELECTOR, ".run-code"))[0]
    run.click()
    driver.find_element(By.ID, "run-confirm").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant .error"))
    assert "run token" in driver.find_element(By.CSS_SELECTOR, ".message.assistant .error").text
    assert "Output:" not in stored(driver)[0]["messages"][1]["content"]


# -- conversations ------------------------------------------------------------------------------
def test_conversations_are_listed_renamed_deleted_and_exported(driver, plain_server):
    open_page(driver, plain_server.url, settings={**GREEDY, "max_tokens": 4})
    type_message(driver, "First question")
    wait(driver, lambda d: len(messages(d)) == 2 and idle(d))
    driver.find_element(By.ID, "new-chat").click()
    type_message(driver, "Second question")
    wait(driver, lambda d: len(stored(d)) == 2 and idle(d))
    titles = lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#conversations li .title")]  # noqa: E731
    assert titles() == ["Second question", "First question"]

    driver.find_element(By.CSS_SELECTOR, "#conversations li:nth-child(2) .title").click()
    assert messages(driver)[0][1] == "First question"
    driver.find_element(By.CSS_SELECTOR, "#conversations li:nth-child(2) .rename").click()
    box = driver.find_element(By.CSS_SELECTOR, ".rename-box")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("Renamed", Keys.ENTER)
    assert titles() == ["Second question", "Renamed"]
    assert driver.find_element(By.ID, "title").text == "Renamed"

    driver.find_element(By.ID, "export-json").click()
    exported = driver.downloads / "Renamed.json"
    wait(driver, lambda d: exported.is_file() and exported.stat().st_size > 0, timeout=10)
    data = json.loads(exported.read_text())
    assert data["title"] == "Renamed" and [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][0]["content"] == "First question"
    driver.find_element(By.ID, "export-md").click()
    markdown = driver.downloads / "Renamed.md"
    wait(driver, lambda d: markdown.is_file() and markdown.stat().st_size > 0, timeout=10)
    assert "# Renamed" in markdown.read_text() and "First question" in markdown.read_text()

    driver.find_element(By.CSS_SELECTOR, "#conversations li:nth-child(2) .delete").click()
    driver.switch_to.alert.accept()
    assert titles() == ["Second question"]
    driver.refresh()
    wait(driver, lambda d: titles() == ["Second question"])


def test_phone_width(driver, plain_server):
    open_page(driver, plain_server.url, conversations=conversation_with("A reply with `code`."))
    driver.set_window_size(390, 844)
    try:
        sidebar = driver.find_element(By.ID, "sidebar")
        wait(driver, lambda d: sidebar.rect["x"] + sidebar.rect["width"] <= 1, timeout=5)  # slid away
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scroll
        driver.find_element(By.ID, "open-sidebar").click()
        wait(driver, lambda d: sidebar.rect["x"] >= 0, timeout=5)
        driver.find_element(By.CSS_SELECTOR, "#conversations li .title").click()
        wait(driver, lambda d: sidebar.rect["x"] + sidebar.rect["width"] <= 1, timeout=5)
        assert driver.find_element(By.ID, "input").is_displayed()
    finally:
        driver.set_window_size(1280, 900)



@pytest.mark.slow
def test_allow_code_refuses_a_public_address_without_a_key():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mistol", "serve", "--model", "demo", "--allow-code", "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--allow-code" in r.stderr and "--api-key" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_serve_prints_the_page_address_with_a_new_run_token_at_each_start():
    import re
    import socket
    import subprocess
    import sys

    tokens = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "mistol", "serve", "--model", "demo", "--allow-code",
                                 "--port", str(port)], stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stderr:
                if "chat page at" in line:
                    break
            page = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=([\w-]+)", line)
            assert page, line
            url, token = page[1].rstrip("/"), page[2]
            tokens.append(token)
            deadline = time.monotonic() + 60
            while True:  # the address is printed before uvicorn listens
                try:
                    r = httpx.post(url + "/api/run", json={"code": "print(6 * 7)"},
                                   headers={"Origin": url, "X-Mistol-Run-Token": token})
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            assert r.status_code == 200 and r.json()["output"] == "42\n"
            assert httpx.post(url + "/api/run", json={"code": "print(1)"}, headers={"Origin": url}).status_code == 403
        finally:
            proc.terminate()
            proc.wait(30)
    assert tokens[0] != tokens[1] and len(tokens[0]) >= 32


def test_with_an_api_key_the_page_asks_for_it_and_the_run_endpoint_needs_it(driver):
    engine, server = start_server("demo", allow_code=True, api_key="sk-page-key")
    with server as url:
        r = httpx.post(url + "/api/run", json={"code": "print(1)"}, headers={"Origin": url})
        assert r.status_code == 401
        r = httpx.post(url + "/api/run", json={"code": "print(2)"},
                       headers={"Origin": url, "Authorization": "Bearer sk-page-key"})
        assert r.status_code == 403  # the key is not the run token
        r = httpx.post(url + "/api/run", json={"code": "print(2)"},
                       headers={"Origin": url, "Authorization": "Bearer sk-page-key",
                                "X-Mistol-Run-Token": server.app.state.server.run_token})
        assert r.status_code == 200 and r.json()["output"] == "2\n"

        open_page(driver, url, settings=GREEDY)
        assert driver.find_element(By.ID, "api-key").is_displayed()  # settings open, asking for the key
        assert "API key" in driver.find_element(By.ID, "notice").text
        type_message(driver, "Hi!")
        wait(driver, lambda d: idle(d) and len(messages(d)) == 2 and d.find_elements(By.CSS_SELECTOR, ".error"))
        assert "API key" in driver.find_element(By.CSS_SELECTOR, ".message.assistant .error").text
        driver.find_element(By.ID, "api-key").send_keys("sk-page-key")
        driver.find_element(By.CSS_SELECTOR, ".message.assistant .regenerate").click()
        wait(driver, lambda d: idle(d) and stored(d)[0]["messages"][1]["content"])
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")


# -- hostile Markdown ----------------------------------------------------------------------------
DEEP_MARKDOWN = {
    "nested-lists": "* " * 2000 + "x",
    "nested-quotes": ">" * 20000,
    "nested-quotes-with-text": ">" * 5000 + " deep text",
    "nested-emphasis": "*_" * 3000 + "x" + "_*" * 3000,
    "nested-links": "[" * 3000 + "a" + "](https://example.org)" * 3000,
    "nested-ordered": "".join(f"{' ' * (3 * i)}1. level {i}\n" for i in range(1500)),
}


def browser_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.mark.parametrize("name", list(DEEP_MARKDOWN))
def test_deeply_nested_markdown_renders_and_the_page_survives_reloads(driver, plain_server, name):
    """It used to throw 'Maximum call stack size exceeded', and a stored conversation broke every reload."""
    reply = DEEP_MARKDOWN[name]
    conversations = [{"id": "c1", "title": "stored", "created": 0, "updated": 0,
                      "messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": reply},
                                   {"role": "user", "content": "after"},
                                   {"role": "assistant", "content": "**still rendered**"}]}]
    browser_errors(driver)  # clear the log
    open_page(driver, plain_server.url, conversations=conversations)
    for reload in (False, True):
        if reload:  # what the page stored, loaded again
            driver.refresh()
            wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        shown = messages(driver)
        assert [role for role, _ in shown] == ["user", "assistant", "user", "assistant"]
        assert shown[1][1].strip() and shown[3][1] == "still rendered"
        last = driver.find_elements(By.CSS_SELECTOR, ".message.assistant .content")[-1]
        assert last.find_element(By.TAG_NAME, "strong").text == "still rendered"
        depth = driver.execute_script(
            "let n = document.querySelector('.message.assistant .content'), d = 0;"
            "while (n.firstElementChild) { n = n.firstElementChild; d++; } return d;")
        assert depth < 60  # capped: deeper text is shown as written
    assert not [e for e in browser_errors(driver) if "call stack" in e or "RangeError" in e]


def test_a_message_that_cannot_render_is_shown_as_text(driver, plain_server):
    open_page(driver, plain_server.url)
    text = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/static/markdown.js').then((m) => {"
        "  const f = m.renderMarkdown('# title\\n```python\\nprint(1)\\n```', {codeBlock() { throw new Error('boom'); }});"
        "  const box = document.createElement('div'); box.append(f);"
        "  done([box.textContent, box.querySelectorAll('h3, .code-block').length]);"
        "}, (e) => done(String(e)));")
    assert text == ["# title\n```python\nprint(1)\n```", 0]
