"""Running the service outside `geosurge serve`'s own uvicorn call: `ServerThread` serves an app
from a background thread (tests, the demo), `ServeProcess` runs `geosurge serve` in a subprocess
(the load generator in `geosurge_index.bench.serve`, so that it does not share the server's GIL)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

from geosurge_index.errors import UserError
from geosurge_index.settings import ServiceSettings


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` from a background thread (tests, benchmarks, the demo).

    `with ServerThread(app) as server: httpx.get(server.url + "/healthz")`.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        from geosurge_index.service.guard import uvicorn_config

        self.host, self.port = host, port or free_port(host)
        state = getattr(app.state, "service", None)  # our app: its settings' timeouts and caps
        settings = state.settings if state is not None else ServiceSettings()
        config = uvicorn_config(app, settings, host=self.host, port=self.port, log_level=log_level,
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServeProcess:
    """`geosurge serve INDEX_DIR` in a subprocess on 127.0.0.1 (a free port), its settings handed
    over as GEOSURGE_* variables (this process's own GEOSURGE_* settings are not inherited)."""

    def __init__(self, settings: ServiceSettings):
        import subprocess

        self.settings = settings.with_(host="127.0.0.1", port=free_port())
        ours = {ServiceSettings.env_name(name) for name in ServiceSettings.model_fields}
        env = {k: v for k, v in os.environ.items() if k.upper() not in ours}
        env.update(self.settings.to_env())
        env["GEOSURGE_NO_PROGRESS"] = "1"
        code = "import sys; from geosurge_index.cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(self.settings.index_dir)],
                                     env=env)
        self.url = f"http://127.0.0.1:{self.settings.port}"

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"geosurge serve exited with code {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise UserError(f"geosurge serve was not ready after {timeout_s:.0f} s")

    def stats(self) -> dict:
        import httpx

        headers = {"X-API-Key": self.settings.api_key} if self.settings.api_key else {}
        return httpx.get(self.url + "/v1/stats", headers=headers, timeout=30).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
