"""The form in a real browser: JupyterLab on localhost, Debian's Chromium driven by Playwright.

Opens the walkthrough, runs it down to the form cell, types an invalid width (the message appears beside the field,
Launch is disabled), then a valid one (accepted, Launch enabled). The screenshots stay in the test's temp folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from playwright import sync_api

from conftest import system_tool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium (playwright's own browser download is not used): a skip with the hint where it is missing,
    a failure in CI, which installs it."""
    return system_tool("chromium", "chromium-browser", install="apt-get install chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path, wanforge_home):
    shutil.copy(ROOT / "notebooks" / "01_walkthrough.ipynb", tmp_path / "01_walkthrough.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
           "WANFORGE_STATE_DIR": str(tmp_path / "launches")}
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--allow-root", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.port_retries=0",
         f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--LabApp.news_url=None",
         "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, token
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_form_in_jupyterlab_with_chromium(chromium, jupyterlab, tmp_path):
    url, token = jupyterlab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{url}/lab/tree/01_walkthrough.ipynb?token={token}&reset", wait_until="domcontentloaded")
            cells = page.locator(".jp-Notebook .jp-Cell")
            cells.first.wait_for(timeout=90_000)
            sync_api.expect(page.locator("#jp-main-statusbar")).to_contain_text("Idle", timeout=90_000)
            nb = nbformat.read(ROOT / "notebooks" / "01_walkthrough.ipynb", as_version=4)
            form_cell = next(i for i, c in enumerate(nb.cells) if "ConfigForm(start)" in c.source)
            width = page.locator(".wf-field-datasets-0-width input")
            for attempt in range(2):  # once (rarely, on a loaded machine) the key presses were lost: run them again
                cells.first.click()
                page.keyboard.press("Escape")  # command mode: Shift+Enter runs the cell and moves on
                for _ in range(form_cell + 1):  # run each cell down to the form cell
                    page.keyboard.press("Shift+Enter")
                try:
                    width.wait_for(timeout=180_000)
                    break
                except sync_api.TimeoutError:
                    if attempt:
                        outputs = page.locator(".jp-OutputArea").all_inner_texts()
                        raise AssertionError(f"the form never showed; cell outputs: {outputs}") from None
            launch = page.locator("button.wf-launch")
            status = page.locator(".wf-status")
            message = page.locator(".wf-message-datasets-0-width")
            sync_api.expect(status).to_contain_text("config OK", timeout=30_000)
            sync_api.expect(launch).to_be_enabled()

            width.fill("100")
            width.press("Enter")
            sync_api.expect(message).to_contain_text("must be a positive multiple of 16", timeout=30_000)
            sync_api.expect(launch).to_be_disabled()
            sync_api.expect(status).to_contain_text("1 problem(s)")
            news = page.get_by_role("button", name="No")  # JupyterLab's "notify about news?" toast
            if news.count():
                news.first.click()
            message.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "form-invalid.png"), full_page=False)

            width.fill("48")
            width.press("Enter")
            sync_api.expect(status).to_contain_text("config OK", timeout=30_000)
            sync_api.expect(message).to_have_text("")
            sync_api.expect(launch).to_be_enabled()
            page.screenshot(path=str(tmp_path / "form-valid.png"), full_page=False)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            browser.close()
    assert (tmp_path / "form-invalid.png").stat().st_size > 10_000
