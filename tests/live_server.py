"""A live `tinyhun serve` app on a free 127.0.0.1 port, in a background thread of the test process (the model is
loaded once per test module and shared with the test's own direct calls)."""
import socket
import threading
import time

import httpx
import uvicorn

from tinyhun.server import Settings, create_app


class LiveServer:
    def __init__(self, model, name="tiny", timeout=600, **settings):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app = create_app(lambda: (model, name), Settings(**settings))
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_healthy(self.url, timeout)

    @property
    def engine(self):
        return self.app.state.server.engine

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_healthy(url, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/health not ready after {timeout} s")
        time.sleep(0.1)
