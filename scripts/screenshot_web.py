"""Take the README's screenshots of the chat page (docs/web-desktop.png, docs/web-phone.png).

Serves the demo model with --allow-code on a loopback port, has a short conversation in
headless Chromium (a greeting, then a question answered by running code), and saves the
page at a desktop and a phone width. Needs chromium, chromium-driver and selenium.

    python scripts/screenshot_web.py [--out docs]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from mistol.engine import Engine
from mistol.server import ServerOptions, create_app


def serve(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def browser(profile: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
                 "--force-device-scale-factor=1"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)


def ask(driver, text: str) -> None:
    box = driver.find_element(By.ID, "input")
    box.send_keys(text, Keys.ENTER)
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "send").is_displayed()
                                    and d.find_elements(By.CSS_SELECTOR, ".message.assistant"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    app = create_app(Engine.load("demo"), ServerOptions(model_name="mistol demo model", allow_code=True))
    server, url = serve(app)
    with tempfile.TemporaryDirectory() as profile:
        driver = browser(profile)
        try:
            driver.set_window_size(1280, 860)
            driver.get(url + "/")
            WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready"))
            driver.execute_script("localStorage.setItem('mistol.settings.v1', JSON.stringify({temperature: 0}));")
            driver.refresh()
            WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready"))
            ask(driver, "Hello!")
            driver.find_element(By.ID, "new-chat").click()
            ask(driver, "What is 37 * 48?")
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".run-code"))
            driver.find_element(By.CSS_SELECTOR, ".run-code").click()
            driver.find_element(By.ID, "run-confirm").click()
            WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "send").is_displayed()
                                            and "1776" in d.find_element(By.ID, "messages").text)
            driver.find_element(By.ID, "input").send_keys("Explain the result.")
            time.sleep(0.3)
            driver.save_screenshot(str(args.out / "web-desktop.png"))
            driver.set_window_size(390, 844)
            time.sleep(0.5)
            driver.save_screenshot(str(args.out / "web-phone.png"))
        finally:
            driver.quit()
            server.should_exit = True
    print(f"wrote {args.out / 'web-desktop.png'} and {args.out / 'web-phone.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
