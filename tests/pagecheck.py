"""
Drives the admin page in headless Chromium (Playwright, with Debian's
Chromium): run by tests/web/test_page.py in a process of its own.

    python -m tests.pagecheck ADMIN_URL UOW SCREENSHOT
"""

from __future__ import annotations

import json
import sys

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main(url: str, uow: str, screenshot: str) -> dict[str, object]:
    seen: dict[str, object] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.on("dialog", lambda dialog: (seen.setdefault("dialogs", []).append(dialog.message), dialog.accept()))  # type: ignore[union-attr]
        page.goto(url)
        row = page.locator(f"tr[data-uow='{uow}']")
        row.wait_for(timeout=10000)
        seen["before"] = row.inner_text()
        page.screenshot(path=screenshot, full_page=True)
        page.select_option("#state", "parked")
        page.locator("#rows td.empty").wait_for(timeout=10000)
        page.select_option("#state", "")
        row.wait_for(timeout=10000)
        row.locator("button[data-action=retry]").click()
        row.wait_for(state="detached", timeout=10000)
        seen["status"] = page.locator("#status").inner_text()
        page.fill("#uow", uow)
        page.click("#lookup")
        page.locator("#detail", has_text='"state": "stored"').wait_for(timeout=10000)
        seen["detail"] = json.loads(page.locator("#detail").inner_text())["state"]
        browser.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
