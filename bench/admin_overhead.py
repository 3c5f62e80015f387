"""What the admin listener costs the credential hot path (issue 13), on loopback.

    python3 bench/admin_overhead.py [--rounds 4] [--seconds 3]

Two ec2metaproxy processes with the same 50 containers (bench/scenarios.py's hot
path: a new connection per request, 16 concurrent clients): one without
adminListen, one with it and GET /metrics and /readyz scraped every second while
it is loaded. They are loaded in alternating rounds (off, on, off, on, ...) so
that drift on the machine hits both alike, and the script prints each round and
the ratios on/off of the median requests a second and p99 latency, measured in
this one run. Every process it starts is stopped by its pid; nothing is asserted.
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

import scenarios as sc  # noqa: E402
import servers as srv  # noqa: E402
from standins import StandIns  # noqa: E402
from test_ec2metaproxy import free_port  # noqa: E402


class Scraper:
    """GETs /metrics and /readyz once a second, as Prometheus and a health check would."""

    def __init__(self, port):
        self.port = port
        self.scrapes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self):
        while not self._stop.is_set():
            for path in ("/metrics", "/readyz"):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as answer:
                        answer.read()
                    self.scrapes += 1
                except OSError:
                    self.failures += 1   # /readyz answers 503 while a part is failing: still a scrape
            self._stop.wait(1.0)


def measure(rounds, seconds, log=print):
    """The alternating rounds; returns {"off": [round results], "on": [...], "scrapes": n, "counted": lines}."""
    roles = [sc.hot_role(n) for n in range(1, sc.HOT_CONTAINERS + 1)]
    out = Path(tempfile.mkdtemp(prefix="emp-admin-bench-"))
    with StandIns(out / "docker.sock") as standins, contextlib.ExitStack() as running:
        for n in range(1, sc.HOT_CONTAINERS + 1):
            standins.docker.add_container(f"hot{n:02d}", [sc.hot_ip(n)], **sc.container_args(sc.hot_role(n)))
        ports = {"off": free_port(), "on": free_port()}
        admin_port = free_port()
        proxies = {}
        for name, port in ports.items():
            config = srv.write_proxy_config(out / f"proxy-{name}.json", port, roles, standins.docker_socket,
                                            standins.imds.url, standins.sts.url)
            if name == "on":
                data = json.loads(Path(config).read_text())
                data["adminListen"] = f"127.0.0.1:{admin_port}"
                Path(config).write_text(json.dumps(data, indent=1))
            proxies[name] = running.enter_context(srv.proxy_server(config, port, out / f"proxy-{name}.log"))
        for name, server in proxies.items():
            server.wait_listening(60)
            sc.check_answers(server.port, standins.sts.url, identity_checks=0)   # every role cached
        results = {name: [] for name in proxies}
        scrapes = 0
        for round_no in range(1, rounds + 1):
            for name, server in proxies.items():
                sc.run_loadgen(server.port, 0.5, 1)   # warm-up
                cpu_before = server.cpu_seconds()
                if name == "on":
                    with Scraper(admin_port) as scraper:
                        result = sc.run_loadgen(server.port, seconds, 1)
                    scrapes += scraper.scrapes
                    result["scrapes"] = scraper.scrapes
                else:
                    result = sc.run_loadgen(server.port, seconds, 1)
                result["cpu_ms_per_request"] = round(
                    1000 * (server.cpu_seconds() - cpu_before) / max(result["requests"], 1), 3)
                results[name].append(result)
                log(f"round {round_no} admin {name:3}: {result['rps']:7.0f} req/s  p50 {result['p50_ms']} ms  "
                    f"p99 {result['p99_ms']} ms  CPU {result['cpu_ms_per_request']} ms/req  "
                    f"errors {result['errors']}" + (f"  scrapes {result['scrapes']}" if name == "on" else ""))
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=2) as answer:
            served = [line for line in answer.read().decode().splitlines()
                      if line.startswith('ec2metaproxy_requests_total{route="iam",status="200"}')]
    return {"off": results["off"], "on": results["on"], "scrapes": scrapes, "counted": served, "logs": str(out)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    measured = measure(args.rounds, args.seconds)
    results, scrapes, served, out = measured, measured["scrapes"], measured["counted"], measured["logs"]

    def median(name, key):
        return statistics.median(result[key] for result in results[name])
    print(f"median req/s: off {median('off', 'rps'):.0f}, on {median('on', 'rps'):.0f}, "
          f"ratio on/off {median('on', 'rps') / median('off', 'rps'):.3f}")
    print(f"median p99 ms: off {median('off', 'p99_ms')}, on {median('on', 'p99_ms')}, "
          f"ratio on/off {median('on', 'p99_ms') / median('off', 'p99_ms'):.3f}")
    print(f"median server CPU ms/req: off {median('off', 'cpu_ms_per_request')}, "
          f"on {median('on', 'cpu_ms_per_request')}, "
          f"ratio on/off {median('on', 'cpu_ms_per_request') / median('off', 'cpu_ms_per_request'):.3f}")
    print(f"round-to-round spread of req/s with the admin off: "
          f"{min(r['rps'] for r in results['off']):.0f}..{max(r['rps'] for r in results['off']):.0f}")
    print(f"scrapes of /metrics and /readyz during the 'on' rounds: {scrapes}; the on proxy counted {served}")
    print(f"logs in {out}")


if __name__ == "__main__":
    main()
