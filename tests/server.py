"""Start a real ``crfiqa serve`` process on a free loopback port for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import SHARED_MODELS


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Server:
    """A ``crfiqa serve`` subprocess; ``url`` is its base URL."""

    def __init__(self, env: dict[str, str] | None = None, log: Path | None = None, args: list[str] | None = None,
                 command: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "CRFIQA_MODELS_DIR": str(SHARED_MODELS), "CRFIQA_PROVIDERS": "CPUExecutionProvider",
                    "CRFIQA_HOST": "127.0.0.1", "CRFIQA_PORT": str(self.port), "CRFIQA_LOG_LEVEL": "info",
                    **(env or {})}
        self.log_path = log
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        cmd = command or [sys.executable, "-m", "crfiqa.cli", "serve"]
        self.proc = subprocess.Popen([*cmd, *(args or [])], env=full_env, stdout=out, stderr=subprocess.STDOUT)

    def wait_up(self, timeout: float = 60.0) -> None:
        """Wait until /healthz answers."""
        self._wait("/healthz", timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until /readyz is 200."""
        self._wait("/readyz", timeout)

    def _wait(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{path} not 200 after {timeout}s: {self.log()}")

    def log(self) -> str:
        """What the server printed (when started with a log file)."""
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
