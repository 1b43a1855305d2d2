"""Take the README's picture of the sandbox from the real page in headless Chromium.

    python -m realplexor.demo.screenshot [--output docs/sandbox.png]

Starts a Realplexor server and the sandbox on free loopback ports, opens
the page in two browsers, chats a little, and saves the first browser's
page. Needs Playwright for Python (``pip install -e '.[test]'``) and a
Chromium binary (``--chromium``, the ``CHROMIUM`` variable, or
/usr/bin/chromium); no browser is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ..client import Realplexor
from .app import Sandbox, SandboxServer
from .online import OnlineList
from .process import ServerProcess, write_config

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WAIT_MS = 10_000


def _chat(first, second) -> None:
    """Some traffic, as two people would make it."""
    first.fill("#add-id", "Habrahabr")
    first.click("#add-form button")
    for sender, ids, text, structured, author in [
        (second, "Alpha,Beta", "Hello from the sandbox! One request, two channels.", False, ""),
        (second, "Alpha,RuTvit", "Structured data arrives as objects, not strings.", True, "Anna"),
        (second, "Habrahabr", "Open this page twice and chat with yourself.", False, ""),
        (first, "Beta,RuTvit,Habrahabr", "Every subscriber gets it at once.", False, "Anna"),
    ]:
        count = first.locator(".message").count()
        sender.fill("#post-ids", ids)
        sender.fill("#post-author", author)
        sender.fill("#post-text", text)
        sender.set_checked("#post-structured", structured)
        sender.click("#post-send")
        first.wait_for_function(f"document.querySelectorAll('.message').length > {count}",
                                timeout=WAIT_MS)
    first.wait_for_selector("#post-feedback:has-text('Sent to')")


def take(output: Path, chromium: str, width: int = 1200) -> Path:
    """Run everything, save the picture at ``output``; the path."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="realplexor-shot-") as tmp:
        config = write_config(Path(tmp) / "realplexor.toml", "127.0.0.1:0", "127.0.0.1:0", 5)
        with open(os.devnull, "w") as quiet:
            server = ServerProcess(config, echo=quiet)
            ports = server.start()
            client = Realplexor("127.0.0.1", ports["IN"], namespace="demo_", timeout=5)
            online = OnlineList(client, interval=0.3)
            http = SandboxServer(("127.0.0.1", 0), Sandbox(client, f"http://127.0.0.1:{ports['WAIT']}/", online))
            online.start()
            http.serve_in_background()
            try:
                with sync_playwright() as playwright:
                    browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS,
                                                         timeout=WAIT_MS * 3)
                    try:
                        pages = []
                        for query in ("", "?ids=Alpha,Habrahabr"):
                            context = browser.new_context(viewport={"width": width, "height": 900},
                                                          device_scale_factor=1)
                            context.set_default_timeout(WAIT_MS)
                            page = context.new_page()
                            page.goto(http.url + query)
                            page.wait_for_selector("html[data-ready=true]")
                            pages.append(page)
                        first, second = pages
                        _chat(first, second)
                        first.wait_for_selector('#online li[data-id="Habrahabr"][data-count="2"]')
                        first.wait_for_selector('#online li[data-id="Alpha"][data-count="2"]')
                        first.wait_for_timeout(1500)   # let the arrival highlight fade
                        output.parent.mkdir(parents=True, exist_ok=True)
                        first.screenshot(path=str(output), full_page=True)
                    finally:
                        browser.close()
            finally:
                http.shutdown()
                http.server_close()
                online.stop()
                server.stop()
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realplexor.demo.screenshot",
                                     description="Save a picture of the sandbox page.")
    parser.add_argument("--output", default="docs/sandbox.png", help="PNG to write (docs/sandbox.png)")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                        help="Chromium binary (/usr/bin/chromium, or the CHROMIUM variable)")
    parser.add_argument("--width", type=int, default=1200, help="page width in pixels (1200)")
    args = parser.parse_args(argv)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        print("realplexor.demo.screenshot: needs Playwright for Python: pip install -e '.[test]'",
              file=sys.stderr)
        return 1
    if not Path(args.chromium).exists():
        print(f"realplexor.demo.screenshot: no Chromium at {args.chromium}", file=sys.stderr)
        return 1
    path = take(Path(args.output), args.chromium, args.width)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
