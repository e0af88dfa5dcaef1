"""Screenshots of the MLflow UI and optuna-dashboard on a study, opened as the search says.

    python benchmarks/ui_screenshots.py                 # runs `autolayer demo` in a temp dir
    python benchmarks/ui_screenshots.py --root mlruns   # a store the demo already wrote

Writes under docs/: mlflow-runs.png (the link the search prints), mlflow-study-run.png (the
study's run: the answer), dashboard-studies.png, dashboard-study.png and dashboard-note.png
(optuna-dashboard's study list, study page and its Note page). Needs headless Chromium
(`apt-get install chromium`); `mlflow ui` and `optuna-dashboard` bind 127.0.0.1 only and stop
at the end. The Chrome DevTools protocol is spoken over a pipe (`--remote-debugging-pipe`), so
nothing but the standard library and Pillow (with matplotlib) is needed. `tests/test_tracking.py`
and `tests/test_report.py` check the served pages with the same helpers (`pytest -m slow`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent  # mlflow, optuna-dashboard and autolayer beside this python
STUDY = "organism-organism-single_layer"  # what `autolayer demo` searches
SERVER_START = 120.0  # seconds: `mlflow ui` takes ~35 s to start on 2 busy cores
PAGE_LOAD = 60.0  # seconds for a page to show what it is waited for


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = SERVER_START) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def serving(args: list[str], health: str, log: Path) -> Iterator[None]:
    """Run a server (its own arguments bind it to 127.0.0.1) until the block ends."""
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_http(health, process)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, port: int, log: Path) -> Iterator[str]:
    """`mlflow ui` on 127.0.0.1:`port`, one worker; yields its address."""
    address = f"http://127.0.0.1:{port}"
    args = [str(BIN / "mlflow"), "ui", "--backend-store-uri", tracking_uri,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with serving(args, address + "/health", log):
        yield address


@contextlib.contextmanager
def dashboard(storage: str, port: int, log: Path) -> Iterator[str]:
    """optuna-dashboard on 127.0.0.1:`port` (a journal file path or a database URL)."""
    address = f"http://127.0.0.1:{port}"
    args = [str(BIN / "optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)]
    with serving(args, address + "/api/studies", log):
        yield address


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe: one page at a time."""

    def __init__(self, width: int = 1600, height: int = 900) -> None:
        path = chromium()
        if path is None:
            raise RuntimeError("no chromium on PATH (apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="autolayer-chromium-")
        to_browser, self._send_fd = os.pipe()
        self._read_fd, from_browser = os.pipe()
        flags = ["--headless", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
                 f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                 "--hide-scrollbars", "--force-device-scale-factor=1"]  # fmt: skip
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses root otherwise
        # The protocol reads fd 3 and writes fd 4 of the browser: a trampoline puts the pipes
        # there (a shell's `3<&N` takes one digit in dash) and becomes the browser.
        trampoline = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(to_browser), str(from_browser), path, *flags,
             "about:blank"],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next = b"", 0
        self.size = (width, height)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are skipped)."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._read_fd, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(message))

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, self.session, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def open(self, url: str, *expected: str, timeout: float = PAGE_LOAD) -> str:
        """Load `url` and wait until its text shows every one of `expected`; returns the text."""
        width, height = self.size
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        self.page("Page.navigate", url=url)
        end = time.monotonic() + timeout
        text = ""
        while time.monotonic() < end:
            text = str(self.evaluate("document.body ? document.body.innerText : ''") or "")
            if all(e in text for e in expected):
                time.sleep(1.0)  # let the charts and the table finish drawing
                return str(self.evaluate("document.body.innerText") or "")
            time.sleep(0.5)
        missing = [e for e in expected if e not in text]
        raise AssertionError(f"{url} never showed {missing}; it shows:\n{text[:2000]}")

    def click(self, selector: str) -> bool:
        """Click the first element matching a CSS selector, if there is one."""
        found = bool(
            self.evaluate(
                f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                " if (e) e.click(); return Boolean(e); })()"
            )
        )
        if found:
            time.sleep(1.0)  # the page redraws
        return found

    def screenshot(self, path: Path, width: int = 1200, colors: int = 96) -> Path:
        """A PNG of the viewport, scaled to `width` and reduced to a palette: a small file."""
        import base64
        import io

        from PIL import Image

        data = base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image = image.resize(
            (width, round(image.height * width / image.width)), Image.Resampling.LANCZOS
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=colors).save(path, optimize=True)
        return path

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.call("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._send_fd)
        os.close(self._read_fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def at(url: str, address: str) -> str:
    """`url` (a link the study holds, to the default `mlflow ui` address) on this server."""
    from autolayer.tracking import LOCAL_UI

    return url.replace(LOCAL_UI, address, 1)


def run_demo(workdir: Path) -> Path:
    """`autolayer demo` in `workdir`; returns its store (mlruns/)."""
    root = workdir / "mlruns"
    subprocess.run([str(BIN / "autolayer"), "demo", "--root", str(root)], cwd=workdir, check=True)
    return root


CLOSE_ASSISTANT = '[data-component-id="mlflow.assistant.chat_panel.close"]'  # opens itself


def shoot(root: Path, out: Path, logs: Path) -> list[Path]:
    """The screenshots of the study in `root`: MLflow's runs table and study run, and
    optuna-dashboard's study list, study page and Note page."""
    from autolayer.storage import load_study
    from autolayer.study import StudyRecord
    from autolayer.tracking import ML_PAGES, default_tracking_uri

    record = StudyRecord.of(load_study(STUDY, None, root))
    assert record.runs_url and record.pick, "the study has no MLflow link or answer yet"
    paths = []
    with Browser(1920, 900) as browser:
        with mlflow_ui(default_tracking_uri(root), free_port(), logs / "mlflow.log") as address:
            browser.open(at(record.runs_url, address), "trial-", "contribution", "repeat")
            browser.click(CLOSE_ASSISTANT)
            paths.append(browser.screenshot(out / "mlflow-runs.png", width=1400))
            browser.size = (1600, 900)
            experiment = record.runs_url.split("/runs?")[0]
            study_run = f"{experiment}/runs/{record.parent_run_id}?{ML_PAGES}"
            browser.open(at(study_run, address), "search/best", "The answer")
            browser.click(CLOSE_ASSISTANT)
            paths.append(browser.screenshot(out / "mlflow-study-run.png"))
        journal = str(root / "optuna" / "journal.log")
        with dashboard(journal, free_port(), logs / "dashboard.log") as address:
            browser.size = (1400, 330)
            browser.open(f"{address}/dashboard", STUDY)
            paths.append(browser.screenshot(out / "dashboard-studies.png", width=1000))
            browser.size = (1400, 1500)
            browser.open(f"{address}/dashboard/studies/0", "Best Trial", "Study User Attributes")
            paths.append(browser.screenshot(out / "dashboard-study.png", width=1000))
            browser.size = (1400, 420)
            browser.open(f"{address}/dashboard/studies/0/note", "The answer")
            paths.append(browser.screenshot(out / "dashboard-note.png", width=1000))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a store `autolayer demo` wrote (default: "
                        "run the demo in a temporary directory)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="autolayer-ui-") as tmp:
        root = args.root.resolve() if args.root else run_demo(Path(tmp))
        for path in shoot(root, args.out, Path(tmp)):
            print(f"{path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
