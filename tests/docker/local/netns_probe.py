"""HTTP probes run inside a container's network namespace (`nsenter -t <pid> -n python netns_probe.py ...`),
so that tests/docker/test_engine.py reaches a container's own 127.0.0.1 and nothing else. Standard library
only: the host's interpreter runs it with the host's file system, only the network namespace is the container's.

  ready PORT TIMEOUT_S          poll GET /health/ready until 200; print {"ready_at": unix time}
  get PORT PATH                 GET PATH; the body to stdout (exit 1 on a non-200)
  post PORT PATH JSON ACCEPT    POST JSON; the body to stdout (exit 1 on a non-200)
  load PORT JSON CONCURRENCY MAX_S
                                closed-loop POSTs to /v1/generate, one connection per request, until the
                                server refuses connections (it shut down) or MAX_S pass; prints "started" once
                                the first response is in, then one JSON list of
                                [start, end, outcome]: outcome is the HTTP status, "refused" (connect refused:
                                nothing listens any more) or "error: ..." (a connection dropped mid-request,
                                a truncated response, ...)
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()  # raises IncompleteRead on a truncated body
        return resp.status, data
    finally:
        conn.close()


def ready(port: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/health/ready", timeout=2.0)[0] == 200:
                print(json.dumps({"ready_at": time.time()}))
                return 0
        except OSError:
            pass
        time.sleep(0.05)
    print(json.dumps({"ready_at": None}))
    return 1


def load(port: int, body: bytes, concurrency: int, max_s: float) -> int:
    results: list[list] = []
    lock = threading.Lock()
    first = threading.Event()
    end_by = time.monotonic() + max_s

    def worker() -> None:
        while time.monotonic() < end_by:
            start = time.time()
            try:
                status, data = request(port, "POST", "/v1/generate", body,
                                       {"Content-Type": "application/json", "Accept": "application/json"})
                outcome: int | str = status
                if status == 200:
                    json.loads(data)  # a complete JSON document
            except ConnectionRefusedError:
                outcome = "refused"
            except Exception as e:  # noqa: BLE001 - every other failure is a dropped/broken request
                outcome = f"error: {type(e).__name__}: {e}"
            with lock:
                results.append([start, time.time(), outcome])
            first.set()
            if outcome == "refused":
                return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    first.wait(max_s)
    print("started", flush=True)
    for t in threads:
        t.join()
    print(json.dumps(results), flush=True)
    return 0


def main(argv: list[str]) -> int:
    cmd, port = argv[0], int(argv[1])
    if cmd == "ready":
        return ready(port, float(argv[2]))
    if cmd == "get":
        status, data = request(port, "GET", argv[2])
    elif cmd == "post":
        status, data = request(port, "POST", argv[2], argv[3].encode(),
                               {"Content-Type": "application/json", "Accept": argv[4]})
    elif cmd == "load":
        return load(port, argv[2].encode(), int(argv[3]), float(argv[4]))
    else:
        raise SystemExit(f"unknown command {cmd!r}: ready, get, post or load")
    sys.stdout.buffer.write(data)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
