"""A real browser: JupyterLab runs the quickstart notebook in Chromium, and its widgets and plots render.

Needs Debian's Chromium (``apt-get install -y chromium``) and Playwright for Python (``pip install
playwright``); no ``playwright install``: the system browser is used. Without them the test fails
and says so.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from test_notebooks import NOTEBOOKS, with_parameters

CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = "01_quickstart.ipynb"
# Smaller still than the notebook test: one small layer, a few tokens; the point here is rendering.
PARAMS = dict(NSAMPLES=4, SEQLEN=64, N_EVAL_WINDOWS=2, MAX_NEW_TOKENS=4, LAYERS=["model.layers.0.self_attn.k_proj"])
RUN_TIMEOUT_S = 600


def _need_browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's Chromium with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: `pip install playwright` (the system Chromium is used; "
                    "no `playwright install` needed)")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(folder: Path) -> None:
    """Lab settings for a test: every cell in the DOM (no virtual scrolling), no news or update checks."""
    settings = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    }
    for rel, value in settings.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def _start_lab(root: Path, home: Path, port: int, token: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
    )
    _write_settings(home / "settings")
    cmd = [
        sys.executable, "-m", "jupyterlab", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
        "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
    ]
    if os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    # Its own session, so the server and its kernel can be stopped together by process group.
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop_lab(proc: subprocess.Popen, base: str, token: str) -> None:
    try:  # a clean shutdown also shuts the kernel down
        req = urllib.request.Request(f"{base}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(req, timeout=10).close()
        proc.wait(timeout=20)
    except Exception:  # noqa: BLE001 - fall through to signals
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def _prompts(page) -> list[str]:
    return page.eval_on_selector_all(".jp-CodeCell .jp-InputArea-prompt", "els => els.map(e => e.textContent.trim())")


@pytest.mark.slow
def test_quickstart_runs_in_chromium_and_renders_widgets_and_plots(tmp_path):
    sync_playwright = _need_browser()
    root, home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    nb = with_parameters(nbformat.read(NOTEBOOKS / NOTEBOOK, as_version=4), PARAMS)
    nbformat.write(nb, root / NOTEBOOK)
    n_code = sum(c.cell_type == "code" for c in nb.cells)

    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "jupyterlab.log"
    shot = tmp_path / "quickstart.png"
    proc = _start_lab(root, home, port, token, log)
    try:
        _wait_ready(proc, f"{base}/api/status?token={token}", log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 2600})
                page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
                page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                       " && window.jupyterapp.shell.currentWidget.sessionContext"
                                       " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                                       " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                                       " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                                       timeout=120_000)
                assert len(_prompts(page)) == n_code

                # Run > Run All Cells, as a user would.
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()

                deadline = time.monotonic() + RUN_TIMEOUT_S
                while True:
                    prompts = _prompts(page)
                    if prompts and all(re.fullmatch(r"\[\d+\]:", t) for t in prompts):
                        break
                    if time.monotonic() > deadline:
                        page.screenshot(path=str(shot))
                        pytest.fail(f"the notebook did not finish within {RUN_TIMEOUT_S} s; prompts {prompts}; screenshot {shot}")
                    time.sleep(1)
                # Let the last outputs (widgets, plotly) mount.
                page.wait_for_selector(".widget-tab .js-plotly-plot", timeout=60_000)
                page.wait_for_timeout(1000)

                errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
                tracebacks = page.locator(".jp-OutputArea-output pre:has-text('Traceback')")
                widget_errors = page.get_by_text("Error displaying widget")
                plots = page.locator(".jp-Notebook .js-plotly-plot")  # the plotly renderer draws on the output node itself
                widget_plots = page.locator(".jp-Notebook .widget-tab .js-plotly-plot")  # the Explorer's FigureWidget
                widgets = page.locator(".jp-OutputArea-output .jupyter-widgets")
                run_button = page.locator(".jp-OutputArea-output .jupyter-widgets button", has_text="Run")
                tabs = page.locator(".jp-OutputArea-output .widget-tab")
                counts = dict(errors=errors.count(), tracebacks=tracebacks.count(), widget_errors=widget_errors.count(),
                              plots=plots.count(), widget_plots=widget_plots.count(), widgets=widgets.count(), run_buttons=run_button.count(), tabs=tabs.count())

                panel = page.locator(".jp-OutputArea-output", has=page.locator(".widget-tab")).last
                panel.scroll_into_view_if_needed()
                page.screenshot(path=str(shot))
                panel_shot = tmp_path / "explorer_panel.png"
                panel.screenshot(path=str(panel_shot))
                # Save from the browser: the file then holds exactly what the front end got from the kernel.
                page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
                print(f"screenshots: {shot} {panel_shot}; counts {counts}")
            finally:
                browser.close()
    finally:
        _stop_lab(proc, base, token)

    saved = nbformat.read(root / NOTEBOOK, as_version=4)
    code = [c for c in saved.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a cell did not run in the browser"
    failed = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not failed, f"a cell failed in the browser: {failed[0].ename}: {failed[0].evalue} (see {shot})"
    assert counts["errors"] == 0 and counts["tracebacks"] == 0, f"an error shows in the page (see {shot})"
    assert counts["widget_errors"] == 0, f"'Error displaying widget' in the page (see {shot})"
    # Every plotly output (error chart, two mask views, histograms, ppl bars) drawn, plus the Explorer's FigureWidget.
    figures = sum("application/vnd.plotly.v1+json" in o.get("data", {}) for c in code for o in c.outputs)
    assert figures >= 5 and counts["widget_plots"] >= 1, counts
    assert counts["plots"] == figures + counts["widget_plots"], counts
    assert counts["widgets"] > 0 and counts["run_buttons"] >= 1 and counts["tabs"] >= 1, counts
    assert shot.stat().st_size > 10_000 and panel_shot.stat().st_size > 10_000
