"""A real uvicorn server on 127.0.0.1 (a free port) in a background thread, for tests that need real sockets
(client disconnects, concurrent clients, the browser)."""

from __future__ import annotations

import threading
import time

import uvicorn


class LiveServer:
    def __init__(self, app, timeout: float = 20.0):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.timeout = timeout
        self.url = None

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.02):
    """Poll predicate() until it returns something truthy (returned) or the timeout passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
