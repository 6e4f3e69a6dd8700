#!/usr/bin/env python3
"""Drives the browser console (/console) of a running mcp-orchestrator with
headless Chromium (Playwright, sync API): a chat turn, its timeline and
service call, the flow graph with the turn's path, a broken flow file's
diagnostics appearing and going away live, and "Save as test" followed by
`mcp-orchestrator test` on the project.

    python tests/console_browser.py BASE_URL PROJECT_DIR BINARY SCREENSHOT_DIR

PROJECT_DIR must be a copy the server serves (MCP_PROJECT_DIR): the test
edits flows/menu.yaml (and restores it) and the server writes a test file
under flows/tests/. Run by tests/console-browser.sh, which sets all that up.
Exit code 0 when every step passed, 1 otherwise (failure.png is saved).
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

TIMEOUT_MS = 15_000  # per wait: the CI machine is slow
RELOAD_TIMEOUT_MS = 10_000
CHROMIUM = "/usr/bin/chromium"
QUESTION = "What's on the menu?"
REPLY = "Here's what we're serving today"
TEST_NAME = "menu turn"


class Run:
    """The steps passed so far, and the one under way (for the failure report)."""

    def __init__(self):
        self.current = "start"
        self.passed = []

    @contextmanager
    def step(self, name):
        self.current = name
        started = time.monotonic()
        yield
        self.passed.append(name)
        print(f"ok   {name} ({time.monotonic() - started:.1f} s)", flush=True)


def write_atomically(path, text):
    """Replaces the file in one rename (the reload never sees it half written);
    the temporary file is hidden, so the project loader skips it."""
    fd, tmp = tempfile.mkstemp(prefix=".console-test-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def run_steps(run, page, base, project, binary, shots):
    menu_file = project / "flows" / "menu.yaml"
    summary = {}

    with run.step("a. the console loads and shows the project generation"):
        page.goto(f"{base}/console")
        expect(page.locator("#status-generation")).to_have_text(re.compile(r"^\d+$"))
        expect(page.locator("#reload-status")).to_have_text("reload ok")
        summary["generation"] = page.locator("#status-generation").text_content()

    with run.step("b. a chat turn gets the menu reply"):
        page.locator("#chat-text").fill(QUESTION)
        page.locator("#chat-send").click()
        bubble = page.locator("#chat-log .bubble.bot", has_text=REPLY)
        expect(bubble).to_be_visible()
        trace_id = bubble.get_attribute("data-trace")
        assert trace_id, "the reply bubble carries no trace id (no trace_id in the /orchestrate answer?)"
        summary["trace_id"] = trace_id

    with run.step("c. the turn is listed; its timeline calls `menu` and the response holds the menu"):
        row = page.locator(f'#turn-list .turn-row[data-trace="{trace_id}"]')
        expect(row).to_be_visible()
        expect(row).to_contain_text(QUESTION)
        row.click()
        expect(page.locator("#turn-title")).to_contain_text("Turn #")
        timeline = page.locator("#timeline")
        expect(timeline.locator(".step-call", has_text="menu").first).to_be_visible()
        call = page.locator('#calls .call[data-service="menu"]').first
        expect(call).to_be_visible()
        response = call.locator(".call-response")
        response.locator(".tree-expand").first.click()
        expect(response.get_by_text("Margherita pizza").first).to_be_visible()
        summary["turn"] = page.locator("#turn-title").text_content()

    with run.step("d. screenshot console-turn.png"):
        page.locator("#panel-steps").evaluate("panel => { panel.scrollTop = 0; }")
        page.screenshot(path=str(shots / "console-turn.png"))

    with run.step("e. the graph shows the turn's path"):
        page.locator("#tab-graph").click()
        expect(page.locator("#graph svg")).to_be_visible()
        # a step node, not only the intent and flow nodes the page also marks
        visited = page.locator('#graph svg [id^="step-"].visited')
        expect(visited).not_to_have_count(0)
        summary["visited"] = visited.count()
        page.screenshot(path=str(shots / "console-graph.png"))

    with run.step("f. a broken flow file shows its diagnostics live, then they go away"):
        original = menu_file.read_text(encoding="utf-8")
        assert "reply:" in original, f"{menu_file} has no `reply:` to break"
        try:
            write_atomically(menu_file, original.replace("reply:", "replyy:", 1))
            diagnostics = page.locator("#diagnostics")
            expect(diagnostics).to_be_visible(timeout=RELOAD_TIMEOUT_MS)
            expect(diagnostics.locator(".diag", has_text="menu.yaml").first).to_be_visible(timeout=RELOAD_TIMEOUT_MS)
            expect(page.locator("#reload-status")).to_have_text("reload failed")
            summary["diagnostic"] = " ".join(diagnostics.locator(".diag").first.inner_text().split())
            page.screenshot(path=str(shots / "console-diagnostics.png"))
        finally:
            write_atomically(menu_file, original)
        expect(page.locator("#diagnostics")).to_be_hidden()
        expect(page.locator("#reload-status")).to_have_text("reload ok")

    with run.step("g. Save as test writes a test that `mcp-orchestrator test` passes"):
        page.locator("#tab-steps").click()
        page.locator(f'#turn-list .turn-row[data-trace="{trace_id}"]').click()
        save = page.locator("#save-test")
        expect(save).to_be_enabled()
        save.click()
        name = page.locator("#test-name")
        expect(name).to_be_visible()
        name.fill(TEST_NAME)
        page.locator("#test-save-confirm").click()
        result = page.locator("#test-result")
        path_text = result.locator("#test-path")
        expect(path_text).to_contain_text("flows/tests/")
        expect(result.locator("#test-yaml")).not_to_be_empty()
        rel = path_text.text_content().strip()
        written = (project / rel).resolve()
        tests_dir = (project / "flows" / "tests").resolve()
        assert written.is_file(), f"the console says {rel} but {written} does not exist"
        assert tests_dir in written.parents, f"{written} is not under {tests_dir}"
        download = result.locator("#test-download")
        assert download.get_attribute("download") == written.name, "the download is not named after the file"
        summary["test file"] = rel

        proc = subprocess.run([str(binary), "test", str(project)], capture_output=True, text=True, timeout=600)
        print(f"---- {binary} test {project} (exit {proc.returncode})")
        print((proc.stdout + proc.stderr).rstrip())
        print("----", flush=True)
        assert proc.returncode == 0, f"`mcp-orchestrator test` exited {proc.returncode}"

    return summary


def main(argv):
    if len(argv) != 5:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    base = argv[1].rstrip("/")
    project = Path(argv[2]).resolve()
    binary = Path(argv[3]).resolve()
    shots = Path(argv[4]).resolve()
    shots.mkdir(parents=True, exist_ok=True)
    (shots / "failure.png").unlink(missing_ok=True)  # from an earlier run

    run = Run()
    page_errors = []
    console_errors = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        page.on("pageerror", lambda err: page_errors.append(str(err)))
        page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
        try:
            summary = run_steps(run, page, base, project, binary, shots)
            # A failed fetch is logged by the browser itself; anything else is the page's fault.
            own = [e for e in console_errors if not e.startswith("Failed to load resource")]
            assert not page_errors, f"uncaught errors in the page: {page_errors}"
            assert not own, f"errors on the page's console: {own}"
        except Exception as err:  # noqa: BLE001 - report any failure the same way
            print(f"FAIL {run.current}", file=sys.stderr)
            print(f"     {type(err).__name__}: {err}", file=sys.stderr)
            for e in page_errors + console_errors:
                print(f"     page: {e}", file=sys.stderr)
            try:
                page.screenshot(path=str(shots / "failure.png"))
                print(f"     screenshot: {shots / 'failure.png'}", file=sys.stderr)
            except Exception as shot_err:  # noqa: BLE001
                print(f"     no screenshot: {shot_err}", file=sys.stderr)
            print(f"console: {len(run.passed)} passed, 1 failed", file=sys.stderr)
            return 1
        finally:
            browser.close()

    for e in console_errors:
        print(f"note: browser console: {e}")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"  screenshots: {shots}")
    print(f"console: {len(run.passed)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
