"""The service under hostile clients (issue 15): silent and trickling connections are closed and
capped, a client that leaves costs one log line and none of its queued images reach the model,
and decoding memory is bounded by pixels (four 9999x9999 PNGs at once)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import httpx
import pytest
from _service_fixtures import jpeg, tiny_locator

from geosurge_index.service.app import create_app
from geosurge_index.service.budget import PixelBudget
from geosurge_index.service.runner import ServerThread
from geosurge_index.settings import ServiceSettings


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return tiny_locator(tmp_path_factory.mktemp("limits"))


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True when the server closes `sock` (EOF, or a reset) within `within_s` seconds."""
    sock.settimeout(within_s)
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            if sock.recv(65536) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def multipart(fields: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    body = b"".join(f'--b\r\nContent-Disposition: form-data; name="{k}"; filename="{n}"\r\n\r\n'.encode()
                    + data + b"\r\n" for k, n, data in fields) + b"--b--\r\n"
    return body, "multipart/form-data; boundary=b"


# -- slow clients -------------------------------------------------------------------------------------


def test_silent_and_trickling_connections_are_closed_and_capped(index):
    index_dir, locator = index
    settings = ServiceSettings(index_dir=index_dir, header_timeout_s=1, idle_timeout_s=1, min_upload_rate=200,
                               max_connections=64)
    app = create_app(settings, locator)
    with ServerThread(app) as srv:
        host, port = srv.host, srv.port
        head_trickle = socket.create_connection((host, port))
        body_trickle = socket.create_connection((host, port))
        silent = [socket.create_connection((host, port)) for _ in range(400)]
        body, ctype = multipart([("images", "a.jpg", jpeg())])
        body_trickle.sendall(f"POST /v1/locate HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode())
        stop = threading.Event()

        def trickle():  # one byte every 0.1 s: the head never completes, the body crawls
            for i in range(100):
                if stop.wait(0.1):
                    return
                for sock, data in ((head_trickle, b"POST /v1/locate HTTP/1.1\r\n"), (body_trickle, body)):
                    try:
                        sock.send(data[i:i + 1])
                    except OSError:
                        pass

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            # over the cap: 503 and closed at once
            assert sum(closed_by_server(s, 0.01) for s in silent[62:]) >= 330
            t0 = time.monotonic()
            assert all(closed_by_server(s, 4) for s in silent), "a silent connection stayed open"
            assert closed_by_server(head_trickle, 4) and closed_by_server(body_trickle, 4)
            waited = time.monotonic() - t0
            open_now = len(srv.server.server_state.connections)
            with httpx.Client(base_url=srv.url, timeout=60) as c:  # the service still answers
                assert c.post("/v1/locate", files={"images": ("a.jpg", jpeg(), "image/jpeg")}).status_code == 200
                figures = c.get("/v1/stats").json()["connections"]
        finally:
            stop.set()
            for s in [*silent, head_trickle, body_trickle]:
                s.close()
    print(f"\n402 hostile connections: all closed within {waited:.1f} s, {open_now} left open; {figures}")
    assert open_now == 0
    assert figures["refused"] >= 330 and figures["head_timeouts"] >= 60 and figures["body_timeouts"] == 1


# -- clients that leave -------------------------------------------------------------------------------


def test_a_client_that_leaves_is_one_log_line_and_its_queued_images_never_reach_the_model(index, caplog):
    index_dir, locator = index
    app = create_app(ServiceSettings(index_dir=index_dir, max_batch_size=1, max_wait_ms=0), locator)
    state = app.state.service
    release, computed = threading.Event(), []
    real = state.batcher.fn

    def model(jobs):  # the first batch holds the model until released
        computed.append(len(jobs))
        release.wait(30)
        return real(jobs)

    state.batcher.fn = model
    caplog.set_level(logging.INFO)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        first = {}
        blocker = threading.Thread(target=lambda: first.update(r=c.post(
            "/v1/locate", files={"images": ("a.jpg", jpeg(1), "image/jpeg")})))
        blocker.start()
        while not computed:
            time.sleep(0.01)
        # a client queues 3 images behind it, then hangs up
        body, ctype = multipart([("images", f"{i}.jpg", jpeg(10 + i)) for i in range(3)])
        leaver = socket.create_connection((srv.host, srv.port))
        leaver.sendall(f"POST /v1/locate HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 20
        while state.batcher.queued < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.batcher.queued == 3
        leaver.close()
        while state.disconnects < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        # and one leaves in the middle of its upload
        half = socket.create_connection((srv.host, srv.port))
        half.sendall(f"POST /v1/locate HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
        time.sleep(0.3)
        half.close()
        while state.disconnects < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        blocker.join(30)
        assert first["r"].status_code == 200
        time.sleep(0.2)
        batching = c.get("/v1/stats").json()["batching"]
    assert computed == [1], computed  # only the first request's image reached the model
    assert batching["dropped_items"] == 3
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(gone) == 2, [r.getMessage() for r in gone]
    assert "3 of its images dropped" in gone[0].getMessage() and "while sending" in gone[1].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], "a traceback was logged"


# -- memory -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_four_huge_pngs_at_once_stay_under_the_decode_budget(index):
    """Issue 15: four 9999x9999 PNGs (under the pixel cap, ~310 KB each) sent at once peaked at
    2.1 GB. Decoding is bounded by `decode_pixel_budget` pixels (about 4 bytes each), not by
    requests; measured in a fresh process (`_memory_probe.py`)."""
    import json
    import subprocess
    import sys

    index_dir, _ = index
    budget = 100_000_000
    probe = os.path.join(os.path.dirname(__file__), "_memory_probe.py")
    run = subprocess.run([sys.executable, probe, str(index_dir), str(budget), "4"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\nfour 9999x9999 PNGs at once, 4 decode threads, budget {budget} pixels "
          f"({4 * budget / 2**20:.0f} MB at 4 B/pixel): {figures}")
    assert figures["statuses"] == [200] * 4 and figures["widths"] == [9999] * 4
    assert figures["decode_pixels"]["peak"] <= budget
    assert figures["peak_mb"] * 2**20 < 4 * budget + 200 * 2**20  # the budget, the bodies and some slack


def test_pixel_budget_bounds_what_decodes_at_once():
    budget = PixelBudget(100)
    held, most, lock = [0], [0], threading.Lock()

    def work(n):
        with budget.hold(n):
            with lock:
                held[0] += min(n, 100)
                most[0] = max(most[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= min(n, 100)

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 30, 30, 500, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] <= 100 and budget.peak <= 100 and budget.used == 0
