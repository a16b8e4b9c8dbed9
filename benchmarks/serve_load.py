"""Load on `vitscope serve` over loopback: N concurrent clients send a fixed count of prediction requests, a
share of them malformed, and the script reports latency, throughput, status codes and the server's memory.

    python benchmarks/serve_load.py                          # starts `vitscope serve --port 0` itself
    python benchmarks/serve_load.py --clients 8 --requests 800 --malformed 0.2 --json
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/   # a server already running (memory: --pid)

Valid requests are digit images (PNG and JPEG, drawn here); malformed ones cycle through the predict tests'
bad inputs (not an image, truncated PNG and JPEG, a decompression bomb's header, an empty body, a wrong
Content-Type). Every answer must be 2xx or 4xx: a 5xx or a failed connection is counted and makes the exit
code 1. Only loopback addresses are accepted, and the run is bounded by --requests and --time-limit.
Latency is per request, from send to the whole answer read, each client on its own keep-alive connection.
The server's memory is its resident set (VmRSS) before the first request and after the last, and its peak
(VmHWM), read from /proc (Linux).
"""
import argparse
import io
import ipaddress
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import zlib
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageDraw


def digit_png(strokes, size=(160, 200)) -> bytes:
    image = Image.new("RGB", size, "white")
    for stroke in strokes:
        ImageDraw.Draw(image).line(stroke, fill="black", width=12)
    return encoded(image, "PNG")


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def requests_to_send() -> tuple[list, list]:
    """(valid, malformed): each a list of (name, content type, body)."""
    one = digit_png([[(85, 30), (80, 170)]])
    seven = digit_png([[(40, 40), (125, 40), (70, 170)]])
    four = digit_png([[(100, 30), (40, 120), (130, 120)], [(100, 60), (100, 175)]])
    seven_jpeg = encoded(Image.open(io.BytesIO(seven)), "JPEG", quality=85)
    valid = [("one.png", "image/png", one), ("seven.png", "image/png", seven), ("four.png", "image/png", four),
             ("seven.jpg", "image/jpeg", seven_jpeg)]
    bomb = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # the header claims 100000x100000 px
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # and its checksum agrees
    malformed = [("text", "image/png", b"these are not the pixels you are looking for"),
                 ("truncated png", "image/png", one[:300]),
                 ("truncated jpeg", "image/jpeg", seven_jpeg[:400]),
                 ("bomb header", "image/png", bytes(bomb)),
                 ("empty", "image/png", b""),
                 ("wrong content type", "text/plain", one)]
    return valid, malformed


def plan(count: int, malformed_share: float, valid: list, malformed: list) -> list:
    """`count` requests, every k-th malformed so the share holds in any stretch of the run."""
    chosen, bad_so_far = [], 0
    for i in range(count):
        if bad_so_far < round((i + 1) * malformed_share):
            chosen.append((True, malformed[bad_so_far % len(malformed)]))
            bad_so_far += 1
        else:
            chosen.append((False, valid[(i - bad_so_far) % len(valid)]))
    return chosen


def memory_of(pid: int | None) -> dict:
    """{"rss_mb", "peak_rss_mb"} of a process, from /proc (None where it cannot be read)."""
    values = {"rss_mb": None, "peak_rss_mb": None}
    if pid is None:
        return values
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = round(int(rest.split()[0]) / 1024, 1)
    except OSError:
        pass
    return values


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"serve_load.py: {url} is not a loopback address; this script only loads servers on this machine")


def start_server(run: str | None, threads_env: dict) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "vitscope", "serve", "--host", "127.0.0.1", "--port", "0", *([run] if run else [])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, **threads_env})
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    line = process.stdout.readline()
    watchdog.cancel()
    if " at http://" not in line:
        process.kill()
        sys.exit(f"serve_load.py: vitscope serve did not start: {line!r}")
    return process, line.split(" at ")[1].split()[0]


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (share in (0, 1])."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(share * len(ordered)))) - 1]


def load(url: str, planned: list, clients: int, time_limit: float) -> tuple[list, float]:
    """Send `planned` from `clients` threads, each taking the next request from a shared index; returns
    ([(malformed, status or error name, seconds)], wall seconds)."""
    results, lock, cursor = [], threading.Lock(), [0]
    deadline = time.perf_counter() + time_limit

    def client():
        with httpx.Client(base_url=url, timeout=30) as http:
            while time.perf_counter() < deadline:
                with lock:
                    if cursor[0] >= len(planned):
                        return
                    is_bad, (_, content_type, body) = planned[cursor[0]]
                    cursor[0] += 1
                started = time.perf_counter()
                try:
                    answer = http.post("/api/predict", content=body, headers={"content-type": content_type})
                    outcome = answer.status_code
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                seconds = time.perf_counter() - started
                with lock:
                    results.append((is_bad, outcome, seconds))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def summary(results: list, wall: float, planned: int, clients: int, before: dict, after: dict) -> dict:
    def latency(rows):
        ms = [seconds * 1000 for _, _, seconds in rows]
        return {"n": len(ms), "p50_ms": round(percentile(ms, 0.5), 2) if ms else None,
                "p99_ms": round(percentile(ms, 0.99), 2) if ms else None,
                "max_ms": round(max(ms), 2) if ms else None}

    statuses = {}
    for _, outcome, _ in results:
        statuses[str(outcome)] = statuses.get(str(outcome), 0) + 1
    server_errors = sum(n for status, n in statuses.items() if status.isdigit() and int(status) >= 500)
    failed = sum(n for status, n in statuses.items() if not status.isdigit())
    return {"clients": clients, "planned": planned, "sent": len(results),
            "malformed": sum(1 for bad, _, _ in results if bad),
            "seconds": round(wall, 2), "requests_per_s": round(len(results) / wall, 1) if wall else None,
            "all": latency(results), "valid": latency([r for r in results if not r[0]]),
            "malformed_latency": latency([r for r in results if r[0]]),
            "statuses": dict(sorted(statuses.items())), "server_errors": server_errors,
            "failed_connections": failed,
            "server_memory_before": before, "server_memory_after": after,
            "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0))}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server on a loopback address (default: start one)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    parser.add_argument("--run", help="run directory to serve when starting the server (default: the bundled model)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=400, help="requests in all (default 400)")
    parser.add_argument("--malformed", type=float, default=0.2, help="share of malformed requests (default 0.2)")
    parser.add_argument("--warmup", type=int, default=8, help="valid requests sent first, not counted (default 8)")
    parser.add_argument("--time-limit", type=float, default=120, help="stop sending after this many seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 100_000 and 0 <= args.malformed <= 1):
        sys.exit("serve_load.py: --clients 1..64, --requests 1..100000, --malformed 0..1")

    process = None
    if args.url:
        url, pid = args.url, args.pid
    else:
        process, url = start_server(args.run, {"OMP_NUM_THREADS": "1"})
        pid = process.pid
    require_loopback(url)
    try:
        valid, malformed = requests_to_send()
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(args.warmup):
                http.post("/api/predict", content=valid[i % len(valid)][2], headers={"content-type": "image/png"})
        before = memory_of(pid)
        planned = plan(args.requests, args.malformed, valid, malformed)
        results, wall = load(url, planned, args.clients, args.time_limit)
        after = memory_of(pid)
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
    report = summary(results, wall, len(planned), args.clients, before, after)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['sent']} requests ({report['malformed']} malformed) from {args.clients} clients in "
              f"{report['seconds']} s: {report['requests_per_s']} requests/s on {report['cpu']} "
              f"({report['cores']} cores)")
        for name in ("all", "valid", "malformed_latency"):
            row = report[name]
            print(f"  {name.replace('_latency', ''):9s} n={row['n']:5d}  p50 {row['p50_ms']} ms  "
                  f"p99 {row['p99_ms']} ms  max {row['max_ms']} ms")
        print(f"  statuses: {report['statuses']}  5xx: {report['server_errors']}  "
              f"failed connections: {report['failed_connections']}")
        print(f"  server memory: {before['rss_mb']} MB before, {after['rss_mb']} MB after "
              f"(peak {after['peak_rss_mb']} MB)")
    return 1 if report["server_errors"] or report["failed_connections"] or report["sent"] < len(planned) else 0


if __name__ == "__main__":
    sys.exit(main())
