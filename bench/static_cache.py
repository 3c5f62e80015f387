"""Upstream calls with and without the static path cache, under a polling load (issue 13).

    python3 bench/static_cache.py [--containers 40] [--seconds 5] [--interval 0.05]

The host's metadata service allows an instance about 1,024 packets a second. Here many
containers (source addresses 127.0.2.1..N, one kept-alive connection each) poll a static
path (instance-id) and a dynamic one (spot/instance-action) through the proxy, once with
the static cache (the default) and once without it, against the IMDS stand-in from
test_ec2metaproxy.py, which counts what reaches it. Prints one table; the ratio of
upstream calls with and without the cache comes from the same run. Nothing is asserted;
everything started here is stopped here. Loopback only.
"""

import argparse
import http.client
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import ec2metaproxy as emp  # noqa: E402
from test_ec2metaproxy import DockerStandIn, ImdsStandIn, free_port  # noqa: E402

STATIC = "/latest/meta-data/instance-id"
DYNAMIC = "/latest/meta-data/spot/instance-action"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=40, help="polling clients (source addresses)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds each phase polls")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between one client's polls")
    return parser.parse_args(argv)


def poll(port, source, stop, interval, counts, lock):
    """One container: ask the static and the dynamic path every interval until stop."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    sent = {STATIC: 0, DYNAMIC: 0, "errors": 0}
    try:
        while not stop.is_set():
            for path in (STATIC, DYNAMIC):
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    response.read()
                    sent[path] += 1
                    if response.status != 200:
                        sent["errors"] += 1
                except (OSError, http.client.HTTPException):
                    sent["errors"] += 1
                    conn.close()
            stop.wait(interval)
    finally:
        conn.close()
        with lock:
            for key, value in sent.items():
                counts[key] = counts.get(key, 0) + value


def phase(args, imds, docker, static_ttl):
    """Run the proxy with the given cache lifetime (0: no cache) under the polling load."""
    config = emp.parse_config({
        "listen": "127.0.0.1:0", "aliasToARN": {"default": "arn:aws:iam::123456789012:role/bench"},
        "defaultAlias": "default", "dockerHost": "unix://" + docker.socket_path, "metadataURL": imds.url,
        "stsRegion": "us-east-1", "stsEndpoint": f"http://127.0.0.1:{free_port()}"})   # never called here
    proxy = emp.Proxy(config, static_ttl=static_ttl)
    proxy.start()
    server = threading.Thread(target=proxy.serve_forever, daemon=True)
    server.start()
    try:
        before = imds.paths()
        stop, lock, counts = threading.Event(), threading.Lock(), {}
        clients = [threading.Thread(target=poll, args=(proxy.address[1], f"127.0.2.{n + 1}", stop, args.interval,
                                                      counts, lock), daemon=True)
                   for n in range(args.containers)]
        started = time.monotonic()
        for client in clients:
            client.start()
        stop.wait(args.seconds)
        stop.set()
        for client in clients:
            client.join(10)
        elapsed = time.monotonic() - started
        upstream = imds.paths()[len(before):]
    finally:
        proxy.shutdown(timeout=2)
        server.join(5)
    return {"elapsed": elapsed, "sent": counts,
            "upstream": {path: upstream.count(path) for path in (STATIC, DYNAMIC)}}


def main(argv=None):
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="emp-bench-cache-")
    imds = ImdsStandIn().start()
    docker = DockerStandIn(str(Path(tmp) / "docker.sock")).start()
    try:
        results = {"cache": phase(args, imds, docker, emp.STATIC_TTL), "no cache": phase(args, imds, docker, 0)}
    finally:
        docker.stop()
        imds.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.containers} containers, each polling {STATIC} and {DYNAMIC} every {args.interval:g} s "
          f"for {args.seconds:g} s, per phase (upstream instance-id includes the proxy's own start-up probe)")
    print(f"{'phase':<9} {'path':<15} {'requests':>9} {'upstream':>9} {'upstream/s':>11} {'upstream/request':>17}")
    for mode, result in results.items():
        for path, name in ((STATIC, "instance-id"), (DYNAMIC, "spot/i-action")):
            sent, up = result["sent"].get(path, 0), result["upstream"][path]
            print(f"{mode:<9} {name:<15} {sent:>9} {up:>9} {up / result['elapsed']:>11.1f} "
                  f"{(up / sent if sent else 0):>17.4f}")
        print(f"{mode:<9} errors: {result['sent'].get('errors', 0)}")
    cached, uncached = results["cache"]["upstream"], results["no cache"]["upstream"]
    total = lambda r: r["upstream"][STATIC] + r["upstream"][DYNAMIC]
    print(f"instance-id upstream calls, cache / no cache: {cached[STATIC]} / {uncached[STATIC]}"
          f" = {cached[STATIC] / max(1, uncached[STATIC]):.4f}")
    print(f"all upstream calls a second, cache / no cache: "
          f"{total(results['cache']) / results['cache']['elapsed']:.1f} / "
          f"{total(results['no cache']) / results['no cache']['elapsed']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
