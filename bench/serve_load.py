"""Load test of the scoring service: start ``serve.py`` on loopback, send N requests at concurrency C, report.

    python bench/serve_load.py                                  # 500 requests at concurrency 8, shipped weights
    python bench/serve_load.py --requests 200 --concurrency 4 --workers 2 --batch-size 4

The server runs in its own process (``python serve.py --port FREE --quiet ...``), as users run it; the demo
images (``demo/*.jpg``, or --images) are sent in turn, each request a multipart upload over keep-alive
connections. Printed: throughput (requests/s over the whole run), latency percentiles (p50/p95/p99, from
sending the request to reading the answer), the errors by status, whether identical files got identical
answers, and the server's memory from /proc: RSS once the model is loaded, after each tenth of the requests
and at the end, and the peak (VmHWM), so that a leak shows as RSS growing with the requests.
"""
from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(ROOT / "weights"), help="weights folder (default: the shipped weights/)")
    p.add_argument("--requests", type=int, default=500, help="requests to send (default: 500)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default: 8)")
    p.add_argument("--images", nargs="+", default=None, help="images to send in turn (default: demo/*.jpg)")
    p.add_argument("--workers", type=int, default=1, help="the server's scoring threads (default: 1)")
    p.add_argument("--threads", type=int, default=0, help="the server's torch threads (default: 0, its own choice)")
    p.add_argument("--batch-size", type=int, default=8, help="the server's batch size (default: 8)")
    p.add_argument("--queue", type=int, default=16,
                   help="the server's queue; at least the concurrency, or requests get 503 (default: 16)")
    p.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for the model to load (default: 600)")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/PID/status (Linux)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of sorted values."""
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        print("error: --requests and --concurrency must be at least 1", file=sys.stderr)
        return 2
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    images = [Path(p) for p in args.images] if args.images else sorted((ROOT / "demo").glob("*.jpg"))
    payloads = [(p.name, p.read_bytes()) for p in images]
    port = free_port()
    command = [sys.executable, str(ROOT / "serve.py"), "--port", str(port), "--weights", args.weights, "--quiet",
               "--workers", str(args.workers), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
               "--queue", str(args.queue)]
    log = tempfile.TemporaryFile("w+")  # the server's own log, shown if it fails
    server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while True:
            if server.poll() is not None:
                log.seek(0)
                print(f"{log.read()[-3000:]}error: the server exited with status {server.returncode}", file=sys.stderr)
                return 1
            try:
                health = httpx.get(f"{url}/health", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - start > args.startup_timeout:
                print(f"error: the server was not ready after {args.startup_timeout:g} s", file=sys.stderr)
                return 1
            time.sleep(0.25)
        ready_s = time.monotonic() - start
        info = health.json()
        rss_ready = memory_kib(server.pid)["VmRSS"]
        print(f"server ready in {ready_s:.1f} s: model {info['model']} (weights {info['fingerprint']}), "
              f"{info['limits']['workers']} worker(s), batch {info['limits']['batch_size']}, "
              f"queue {info['limits']['queue']}; RSS {rss_ready / 1024:.0f} MiB")

        latencies: list[float] = [0.0] * args.requests
        statuses: list[int] = [0] * args.requests
        answers: dict[str, list[float]] = {}
        verdicts: dict[str, set[str]] = {}
        lock = threading.Lock()
        rss_series: list[int] = []  # the server's RSS after each tenth of the requests
        done = [0]
        client = httpx.Client(base_url=url, timeout=120,
                              limits=httpx.Limits(max_connections=args.concurrency,
                                                  max_keepalive_connections=args.concurrency))

        def one(i: int) -> None:
            name, data = payloads[i % len(payloads)]
            t0 = time.perf_counter()
            try:
                r = client.post("/v1/score", files={"file": (name, data, "image/jpeg")})
                status = r.status_code
                body = r.json() if status == 200 else None
            except httpx.HTTPError:
                status, body = -1, None
            latencies[i] = time.perf_counter() - t0
            statuses[i] = status
            with lock:
                if body is not None:
                    answers.setdefault(name, []).append(body["prob"])
                    verdicts.setdefault(name, set()).add(body["verdict"])
                done[0] += 1
                if done[0] * 10 // args.requests > len(rss_series):
                    rss_series.append(memory_kib(server.pid)["VmRSS"])
                    print(f"  {done[0]} / {args.requests} answered, server RSS {rss_series[-1] / 1024:.0f} MiB",
                          file=sys.stderr, flush=True)

        t_start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.requests)))
        elapsed = time.perf_counter() - t_start
        client.close()
        memory = memory_kib(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()

    ok = sorted(lat for lat, st in zip(latencies, statuses) if st == 200)
    errors: dict[int, int] = {}
    for st in statuses:
        if st != 200:
            errors[st] = errors.get(st, 0) + 1
    print(f"{args.requests} requests at concurrency {args.concurrency} ({len(payloads)} images in turn) "
          f"in {elapsed:.1f} s: {args.requests / elapsed:.2f} requests/s")
    if ok:
        print("latency ms: " + "  ".join(f"p{q} {1000 * percentile(ok, q):.0f}" for q in (50, 95, 99))
              + f"  max {1000 * ok[-1]:.0f}")
    print(f"errors: {sum(errors.values())}" + (f" (by status: {errors}; -1 = no answer)" if errors else ""))
    # Identical files must get the same verdict and, batched with different neighbours, the same probability
    # up to float32 rounding.
    spread = max((max(v) - min(v) for v in answers.values()), default=0.0)
    consistent = all(len(v) == 1 for v in verdicts.values()) and spread < 1e-5
    print(f"identical files, identical answers: {'yes' if consistent else 'NO'} (largest spread of one file's "
          f"probability: {spread:.1e})")
    series = ", ".join(f"{kib / 1024:.0f}" for kib in rss_series)
    print(f"server RSS MiB: ready {rss_ready / 1024:.0f}; after each tenth of the requests {series}; "
          f"end {memory['VmRSS'] / 1024:.0f}; peak (VmHWM) {memory['VmHWM'] / 1024:.0f}")
    print(f"server stopped with status {server.returncode}")
    return 0 if not errors and consistent else 1


if __name__ == "__main__":
    sys.exit(main())
