"""uvicorn serving an app on a thread of this process, on a free loopback port: what the tests and the serving
benchmark talk to with real HTTP clients."""

from __future__ import annotations

import threading
import time

import uvicorn


class BackgroundServer:
    """Starts serving `app` at once (`url`); `stop` shuts it down (the app's shutdown closes its scheduler)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="vlm-serve-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {host}:{port} (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port} within {start_timeout_s} s")
            time.sleep(0.02)
        bound_host, bound_port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{bound_host}:{bound_port}"

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
