#!/usr/bin/env python3
"""Soak test of `differnet serve` on loopback (standard library only; scripts/soak.sh runs it).

Starts the service on a model, then for SOAK_SECONDS (default 1800) runs concurrent clients that
mix good images and junk bytes (on `/v1/score` and the Open Inference Protocol's
`/v2/models/part/infer`), decompression bombs (a PNG header claiming 60000×60000 pixels),
truncated images, oversized bodies, slow senders (headers dribbled, bodies never finished) and a SIGHUP reload
every RELOAD_SECONDS (default 180). Every 10 s it samples the server's RSS. At the end it prints
requests by kind and status, p50/p99 latency of good requests, the RSS samples and a verdict:
no 5xx other than 503 (busy), every good request answered 200 (or 503), every slow sender cut
off, and RSS flat after warm-up: the largest sample of the last third of the run within 10% of
the largest of the first third (a reload briefly holds two copies of a model; growth from
reload to reload would be a leak). Exits 1 when the verdict fails. Stops by itself.

Usage: scripts/soak.py MODEL IMAGE [extra serve flags]
"""
import http.client
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

SOAK = float(os.environ.get("SOAK_SECONDS", 1800))
RELOAD = float(os.environ.get("RELOAD_SECONDS", 180))
PORT = int(os.environ.get("PORT", 18181))
BIN = os.environ.get("DIFFERNET_BIN", "target/release/differnet")
WARMUP = min(120.0, SOAK / 5)
MODEL_NAME = "part"


def bomb_png(side=60000):
    ihdr = b"IHDR" + struct.pack(">II", side, side) + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.latency = []

    def add(self, kind, status, seconds=None):
        with self.lock:
            self.counts[(kind, status)] = self.counts.get((kind, status), 0) + 1
            if seconds is not None:
                self.latency.append(seconds)


def v2_infer(image):
    """An Open Inference Protocol infer request: one BYTES element in the binary extension."""
    data = struct.pack("<I", len(image)) + image
    head = ('{"inputs":[{"name":"input","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":%d}}],'
            '"parameters":{"binary_data_output":true}}' % len(data)).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


def post(body, timeout=120, route="/v1/score", headers=None):
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    try:
        c.request("POST", route, body=body, headers={"Content-Type": "application/octet-stream", **(headers or {})})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def body_junk(rng):
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096)))


def client(stop, stats, image, seed):
    rng = random.Random(seed)
    kinds = ["good"] * 5 + ["v2-good", "v2-junk", "junk", "bomb", "truncated", "oversized"]
    while not stop.is_set():
        kind = rng.choice(kinds)
        body = {
            "good": lambda: image,
            "v2-good": lambda: b"",
            "v2-junk": lambda: b"",
            "junk": lambda: body_junk(rng),
            "bomb": bomb_png,
            "truncated": lambda: image[: rng.randint(1, max(1, len(image) - 1))],
            "oversized": lambda: b"\0" * (33 << 20),
        }[kind]()
        if kind.startswith("v2-"):
            body, headers = v2_infer(image if kind == "v2-good" else body_junk(rng))
            route = f"/v2/models/{MODEL_NAME}/infer"
        else:
            route, headers = "/v1/score", None
        t = time.monotonic()
        try:
            status = post(body, route=route, headers=headers)
        except (OSError, http.client.HTTPException) as e:
            # the server may answer 413 and close while a large body is still being sent
            status = "refused-early" if kind == "oversized" and isinstance(e, BrokenPipeError) else f"error:{type(e).__name__}"
        stats.add(kind, status, time.monotonic() - t if kind.endswith("good") and status == 200 else None)


def slow_sender(stop, stats, seed):
    rng = random.Random(seed)
    while not stop.is_set():
        s = socket.create_connection(("127.0.0.1", PORT))
        try:
            if rng.random() < 0.5:
                s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            else:
                s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
            s.settimeout(120)
            got = b""
            try:
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            except socket.timeout:
                got = b"(not closed)"
            status = got.split(b" ")[1].decode() if got.startswith(b"HTTP/1.1 ") else ("closed" if not got else "held")
            stats.add("slow", status)
        finally:
            s.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def main():
    model, image_path, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    image = open(image_path, "rb").read()
    server = subprocess.Popen(
        [BIN, "--quiet", "serve", "--model", f"{MODEL_NAME}={model}", "--addr", f"127.0.0.1:{PORT}", "--read-timeout", "5", *extra],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(240):
            try:
                c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        stop, stats = threading.Event(), Stats()
        threads = [threading.Thread(target=client, args=(stop, stats, image, i)) for i in range(4)]
        threads += [threading.Thread(target=slow_sender, args=(stop, stats, 100 + i)) for i in range(4)]
        for t in threads:
            t.start()
        start, samples, reloads, next_reload = time.monotonic(), [], 0, RELOAD
        while (now := time.monotonic() - start) < SOAK:
            time.sleep(10)
            samples.append((round(time.monotonic() - start), rss_kib(server.pid)))
            print(f"t={samples[-1][0]:>5} s  rss={samples[-1][1]} KiB", flush=True)
            if now >= next_reload:
                server.send_signal(signal.SIGHUP)
                reloads, next_reload = reloads + 1, next_reload + RELOAD
        stop.set()
        for t in threads:
            t.join(timeout=150)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"\nsoak {SOAK:.0f} s, {reloads} reloads (SIGHUP)\n\nkind        status   count")
    for (kind, status), n in sorted(stats.counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"{kind:<11} {str(status):<8} {n}")
    lat = sorted(stats.latency)
    if lat:
        print(f"\ngood requests answered 200: p50 {lat[len(lat) // 2] * 1000:.0f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms")
    after = [r for t, r in samples if t >= WARMUP]
    print(f"RSS after warm-up ({WARMUP:.0f} s): first {after[0] if after else '-'} KiB, max {max(after) if after else '-'} KiB, last {after[-1] if after else '-'} KiB")
    print(f"RSS samples (s, KiB): {samples}")
    bad5xx = sum(n for (k, s), n in stats.counts.items() if isinstance(s, int) and s >= 500 and s != 503)
    good_failed = sum(n for (k, s), n in stats.counts.items() if k.endswith("good") and s not in (200, 503))
    held = sum(n for (k, s), n in stats.counts.items() if k == "slow" and s == "held")
    third = max(1, len(after) // 3)
    flat = not after or max(after[-third:]) <= 1.10 * max(after[:third])
    ok = bad5xx == 0 and good_failed == 0 and held == 0 and flat
    print(f"5xx other than 503: {bad5xx}; good requests not answered 200/503: {good_failed}; slow clients never cut off: {held}; RSS flat: {flat}")
    print("verdict:", "pass" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
