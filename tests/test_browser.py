"""The HTML reports as a person sees them: loaded in headless Chromium, every figure drawn, no console error.

The reports are produced the way a user produces them, through the command line (``bayes-dgme fit ...
--report`` and ``bayes-dgme study ... --report``), from a tiny real fit and an EM-only study. Chromium
is driven over the Chrome DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
ending in a NUL byte on file descriptors 3 and 4), so the test needs nothing beyond Debian's
``chromium`` package: no driver, no browser download, no Python dependency.

In CI (``CI=true``) a missing Chromium fails the test: ``.ci/run`` installs it, and a skipped
browser test would hide a report that does not render. Elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bayes_dgme.cli import main as cli_main

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT = 90.0  # seconds for Chromium to start and load one self-contained page (2 busy cores)


def find_chromium() -> str | None:
    """The Chromium executable (``$CHROMIUM`` first, then the usual names), or None."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def require_chromium() -> str:
    path = find_chromium()
    if path is None:
        msg = "headless Chromium (Debian's `chromium`) is not installed"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{msg}; .ci/run must install it (apt-get install -y chromium)")
        pytest.skip(msg)
    return path


def _above_nine(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class DevTools:
    """A headless Chromium driven over the DevTools protocol on a pipe (fd 3: commands in, fd 4: out)."""

    def __init__(self, executable: str, profile: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        # move Chromium's ends above 9, so that putting them on 3 and 4 cannot clobber one another
        cmd_r, res_w = (_above_nine(fd) for fd in (cmd_r, res_w))
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-dev-shm-usage", "--window-size=1280,2000", "about:blank"]
        # bash (dash takes one-digit descriptors only) puts our ends on 3 and 4, where Chromium expects them
        script = f'exec "$0" "$@" 3<&{cmd_r} 4>&{res_w} {cmd_r}<&- {res_w}>&-'
        self._log = open(profile / "chromium.log", "wb")  # closed in close()
        self.proc = subprocess.Popen(["/bin/bash", "-c", script, *args], pass_fds=(cmd_r, res_w),
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.log_path = profile / "chromium.log"

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == self._next_id, f"reply to {method}")
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str | None = None) -> dict:
        for ev in self.events:
            if ev.get("method") == method and ev.get("sessionId") == session:
                return ev
        return self._wait(lambda m: m.get("method") == method and m.get("sessionId") == session, method)

    def _wait(self, want, what: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "method" in msg:
                    self.events.append(msg)
                if want(msg):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise TimeoutError(f"Chromium: no {what} within {TIMEOUT:.0f} s; its log ends:\n{tail}")
            ready, _, _ = select.select([self._res_r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._res_r, 1 << 20)
                if not chunk:
                    raise TimeoutError(f"Chromium closed the pipe before the {what}")
                self._buf += chunk

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close")
                self.proc.wait(timeout=20)
        except (OSError, TimeoutError, RuntimeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            for fd in (self._cmd_w, self._res_r):
                os.close(fd)
            self._log.close()


# every <img>: loaded, decodable (decode() rejects a broken image), with pixels and a laid-out box
IMAGES_JS = """
Promise.all(Array.from(document.images).map(async (img) => {
  let decodeError = null;
  try { await img.decode(); } catch (e) { decodeError = String(e); }
  const box = img.getBoundingClientRect();
  return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
          naturalHeight: img.naturalHeight, width: box.width, height: box.height, decodeError};
})).then((imgs) => JSON.stringify({title: document.title, images: imgs,
                                   sections: document.querySelectorAll("section").length}))
"""


def render(chromium: str, page: Path, profile: Path) -> tuple[dict, list[str]]:
    """Load ``page``; return what the page reports about its images and every console error."""
    profile.mkdir(parents=True, exist_ok=True)
    browser = DevTools(chromium, profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired", session=session)
        result = browser.send("Runtime.evaluate", {"expression": IMAGES_JS, "awaitPromise": True,
                                                   "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluating the image check failed: {result['exceptionDetails']}")
        info = json.loads(result["result"]["value"])
        errors = []
        for ev in browser.events:
            p = ev.get("params", {})
            if ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                                       for a in p.get("args", [])))
            elif ev["method"] == "Runtime.exceptionThrown":
                errors.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif ev["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                errors.append(f"{entry.get('source')}: {entry.get('text')} ({entry.get('url', '')})")
        return info, errors
    finally:
        browser.close()


def assert_every_figure_drawn(info: dict, errors: list[str], min_images: int) -> None:
    assert not errors, f"console errors: {errors}"
    imgs = info["images"]
    assert len(imgs) >= min_images, f"expected at least {min_images} figures, the page has {len(imgs)}"
    for img in imgs:
        label = img["alt"] or "(no alt text)"
        assert img["decodeError"] is None, f"figure {label!r} does not decode: {img['decodeError']}"
        assert img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0, f"figure {label!r} not drawn"
        assert img["width"] > 50 and img["height"] > 50, f"figure {label!r} laid out at {img['width']}×{img['height']}"


@pytest.fixture(scope="module")
def fit_report(tmp_path_factory) -> Path:
    """The report of a tiny real posterior fit, made through the command line."""
    out = tmp_path_factory.mktemp("browser_fit")
    argv = ["fit", "d1_exact", "--n", "150", "--seed", "1", "--draws", "60", "--tune", "60", "--chains", "2",
            "--no-deviation-test", "--quiet", "--out", str(out / "fit.nc"), "--report", str(out / "fit.html")]
    assert cli_main(argv) == 0
    return out / "fit.html"


@pytest.fixture(scope="module")
def study_report(tmp_path_factory) -> Path:
    """The report of a small EM-only contraction study, made through the command line."""
    out = tmp_path_factory.mktemp("browser_study")
    argv = ["study", "d1_exact", "--n", "100,200,400", "--reps", "2", "--estimators", "em", "--seed", "3",
            "--workers", "1", "--quiet", "--out", str(out / "study"), "--report", str(out / "study.html")]
    assert cli_main(argv) == 0
    return out / "study.html"


@pytest.mark.parametrize(("which", "min_images"), [("fit_report", 6), ("study_report", 2)])
def test_report_renders_in_headless_chromium(which, min_images, request, tmp_path):
    chromium = require_chromium()
    page = request.getfixturevalue(which)
    info, errors = render(chromium, page, tmp_path / "profile")
    assert info["title"], "the page has no title"
    assert info["sections"] >= 3, f"only {info['sections']} sections rendered"
    assert_every_figure_drawn(info, errors, min_images)


def test_the_check_catches_a_broken_figure_and_a_console_error(tmp_path):
    """The checks above can fail: a truncated PNG and a script error are both reported."""
    chromium = require_chromium()
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><title>t</title><section></section><section></section><section></section>'
                    '<img alt="cut" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA">'
                    "<script>console.error('boom')</script>", encoding="utf-8")
    info, errors = render(chromium, page, tmp_path / "profile")
    assert any("boom" in e for e in errors), errors
    (img,) = info["images"]
    assert img["naturalWidth"] == 0 and img["decodeError"] is not None
    with pytest.raises(AssertionError, match="console errors"):
        assert_every_figure_drawn(info, errors, 1)
    with pytest.raises(AssertionError, match="does not decode"):
        assert_every_figure_drawn(info, [], 1)
