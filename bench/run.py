"""Performance benchmark of ec2metaproxy (issue 6), all on loopback.

    python3 bench/run.py

Builds its own bench-only venvs on first use (Lyft's metadataproxy;
matplotlib for the plot and py-spy for bench/cpu_profile.py), starts the
stand-ins from test_ec2metaproxy.py (Docker Engine on a unix socket, moto's
STS behind a recording front, host IMDS) and compares, in alternating rounds:

1. the credential hot path from 50 containers (source addresses
   127.0.1.1-50, each asking for its own role), a new connection per
   request, 16 concurrent clients, for ec2metaproxy, a bare stdlib
   ThreadingHTTPServer answering from memory, and Lyft's metadataproxy;
   a trivial server in the same rounds gives the load generator's ceiling;
2. the STS and Docker calls the servers make during that load;
3. a new container's first credential request, 1.5 s after and right
   after its start event;
4. ec2metaproxy with 1,000 and 5,000 containers: RSS, start-up until
   serving, STS calls at start-up per second, lookup latency;
5. the hot path again with keep-alive connections.

It prints one table, writes docs/performance.md and docs/performance.png,
and keeps raw results and server logs in bench/out/.  Every process it
starts is stopped by its pid, also on errors; nothing is asserted.
"""

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

import admin_overhead  # noqa: E402
import fleet_sim  # noqa: E402
import report  # noqa: E402
import scenarios as sc  # noqa: E402
import servers as srv  # noqa: E402
import venvs  # noqa: E402
from standins import StandIns  # noqa: E402
from test_ec2metaproxy import free_port  # noqa: E402

OUT_DIR = BENCH_DIR / "out"
LOG_DIR = OUT_DIR / "logs"
DOCS_DIR = REPO_ROOT / "docs"
COMMAND = "python3 bench/run.py"
KEEPALIVE_REQUESTS = 100          # requests per connection in the keep-alive runs
# (seconds between start event and first request, seconds its create event came before the start)
FIRST_REQUEST_KINDS = ((1.5, None), (0.0, None), (0.0, 0.05))
FIRST_REQUEST_SAMPLES = 5          # per kind and server
SCALE_SIZES = (1000, 5000)
SCALE_ROLES = 100
RESTART_CONTAINERS = 1000
RESTART_STS_LIMIT = (15.0, 15.0)   # the STS stand-in's budget: calls a second, burst
SIM_HOURS = 24                     # simulated hours for the STS calls per container-hour


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one timed window")
    return parser.parse_args()


def make_logger():
    began = time.monotonic()

    def log(message):
        print(f"[{time.monotonic() - began:6.1f}s] {message}", file=sys.stderr, flush=True)

    return log


def fresh_samples(roles, subnet):
    """First-request samples, alternating kinds, each with an unused role."""
    samples = []
    for index in range(FIRST_REQUEST_SAMPLES):
        for offset, (delay, create_gap) in enumerate(FIRST_REQUEST_KINDS):
            n = index * len(FIRST_REQUEST_KINDS) + offset
            samples.append((delay, create_gap, roles[n], f"127.0.{subnet}.{n + 1}"))
    return samples


def compare_servers(lyft_python, args, log):
    """Measurements 1, 2, 3 and 5: the three servers side by side."""
    hot_roles = [sc.hot_role(n) for n in range(1, sc.HOT_CONTAINERS + 1)]
    fresh_roles = [f"fresh{n:02d}" for n in range(1, 1 + FIRST_REQUEST_SAMPLES * len(FIRST_REQUEST_KINDS))]
    with StandIns(OUT_DIR / "docker.sock") as standins, contextlib.ExitStack() as running:
        for n in range(1, sc.HOT_CONTAINERS + 1):
            standins.docker.add_container(f"hot{n:02d}", [sc.hot_ip(n)], **sc.container_args(sc.hot_role(n)))
        creds_file = OUT_DIR / "credentials.json"
        creds_file.write_text(json.dumps(sc.assumed_credentials(standins.sts.url, hot_roles)))
        ports = {name: free_port() for name in ("ec2metaproxy", "reference", "lyft", "trivial")}
        config = srv.write_proxy_config(OUT_DIR / "proxy-hot.json", ports["ec2metaproxy"],
                                        hot_roles + fresh_roles, standins.docker_socket,
                                        standins.imds.url, standins.sts.url)
        servers = {
            "ec2metaproxy": srv.proxy_server(config, ports["ec2metaproxy"], LOG_DIR / "ec2metaproxy.log"),
            "reference": srv.reference_server(creds_file, ports["reference"], LOG_DIR / "reference.log"),
            "lyft": srv.lyft_server(lyft_python, ports["lyft"], LOG_DIR / "lyft.log", standins.docker_socket,
                                    standins.imds.url, standins.sts.url),
            "trivial": srv.trivial_server(ports["trivial"], LOG_DIR / "trivial.log"),
        }
        for server in servers.values():
            running.enter_context(server)
        for server in servers.values():
            server.wait_listening()
        identities = {}
        for name in ("ec2metaproxy", "reference", "lyft"):
            identities[name] = sc.check_answers(ports[name], standins.sts.url)
            log(f"{name} answers every container with its own role ({identities[name]['arns'][0]}; "
                f"{identities[name]['unavailable_before_ready']} answers 503 before that)")
        log("warming every server's caches up (2 s of load each)")
        for server in servers.values():
            sc.run_loadgen(server.port, 2.0, 1)
        log("hot path, a new connection per request")
        new_conn = sc.alternate_rounds(servers, standins, args.rounds, args.seconds, 1, log)
        log(f"hot path, keep-alive ({KEEPALIVE_REQUESTS} requests per connection)")
        keep_alive = sc.alternate_rounds(servers, standins, args.rounds, args.seconds, KEEPALIVE_REQUESTS, log)
        first = {}
        for subnet, name in ((2, "ec2metaproxy"), (3, "lyft")):
            log(f"first requests of new containers: {name}")
            first[name] = sc.first_requests(ports[name], standins.docker,
                                            fresh_samples(fresh_roles, subnet), log)
        proxy_rss = servers["ec2metaproxy"].rss_mb()
    return {"identities": identities, "new_connection": new_conn, "keep_alive": keep_alive,
            "first_request": first, "hot_proxy_rss_mb": round(proxy_rss, 1)}


def scale(count, log):
    """Measurement 4: ec2metaproxy started against `count` containers."""
    roles = [sc.scale_role(index, SCALE_ROLES) for index in range(SCALE_ROLES)]
    with StandIns(OUT_DIR / f"docker-{count}.sock") as standins:
        for index in range(count):
            standins.docker.add_container(f"c{index:05d}", [sc.scale_ip(index)],
                                          emit=False, **sc.container_args(sc.scale_role(index, SCALE_ROLES)))
        port = free_port()
        config = srv.write_proxy_config(OUT_DIR / f"proxy-{count}.json", port, roles,
                                        standins.docker_socket, standins.imds.url, standins.sts.url)
        return sc.scale_run(count, SCALE_ROLES, standins,
                            lambda: srv.proxy_server(config, port, LOG_DIR / f"ec2metaproxy-{count}.log"), log)


def restart(log):
    """A host restart with RESTART_CONTAINERS running containers, STS throttling above a set rate."""
    roles = [sc.scale_role(index, SCALE_ROLES) for index in range(SCALE_ROLES)]
    with StandIns(OUT_DIR / "docker-restart.sock") as standins:
        for index in range(RESTART_CONTAINERS):
            standins.docker.add_container(f"r{index:05d}", [sc.scale_ip(index)], emit=False,
                                          **sc.container_args(sc.scale_role(index, SCALE_ROLES)))
        standins.sts.set_limit(*RESTART_STS_LIMIT)
        port = free_port()
        config = srv.write_proxy_config(OUT_DIR / "proxy-restart.json", port, roles,
                                        standins.docker_socket, standins.imds.url, standins.sts.url)
        return sc.restart_under_throttling(
            RESTART_CONTAINERS, SCALE_ROLES, standins,
            lambda: srv.proxy_server(config, port, LOG_DIR / "ec2metaproxy-restart.log"), log)


def calls_per_container_hour():
    """STS calls per container-hour for both session scopes, on bench/fleet_sim.py's simulated clock
    (the proxy's own pacer and refresh schedule; one host, 50 containers of 5 roles)."""
    result = {}
    for scope in ("container", "role"):
        args = fleet_sim.parse_args(["--hosts", "1", "--containers", "50", "--roles", "5",
                                     "--seconds", str(SIM_HOURS * 3600), "--scenario", "steady"])
        fleet, _ = fleet_sim.simulate(args, "steady", scope, args.seconds)
        result[scope] = round(sum(fleet.timeline.calls) / (50 * SIM_HOURS), 2)
    return result


def main():
    args = parse_args()
    log = make_logger()
    began = time.monotonic()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    lyft_python = venvs.ensure_venv(venvs.LYFT_VENV, venvs.LYFT_STEPS, log)
    tools_python = venvs.ensure_venv(venvs.TOOLS_VENV, venvs.TOOLS_STEPS, log)
    results = {"command": COMMAND, "machine": report.machine_info(),
               "settings": {"rounds": args.rounds, "seconds": args.seconds,
                            "containers": sc.HOT_CONTAINERS, "concurrency": sc.CONCURRENCY,
                            "keepalive_requests": KEEPALIVE_REQUESTS,
                            "first_request_samples": FIRST_REQUEST_SAMPLES,
                            "scale_roles": SCALE_ROLES},
               "venvs_ready_s": round(time.monotonic() - began, 1)}
    results.update(compare_servers(lyft_python, args, log))
    results["scale"] = []
    for count in SCALE_SIZES:
        log(f"scale: {count} containers")
        results["scale"].append(scale(count, log))
    log(f"restart: {RESTART_CONTAINERS} containers, STS throttling above {RESTART_STS_LIMIT[0]:g}/s")
    results["restart"] = restart(log)
    results["calls_per_container_hour"] = calls_per_container_hour()
    log("hot path with the admin listener off and on (scraped every second), alternating rounds")
    results["admin"] = admin_overhead.measure(args.rounds, args.seconds, log)
    results["wall_s"] = round(time.monotonic() - began, 1)
    results_file = OUT_DIR / "results.json"
    results_file.write_text(json.dumps(results, indent=1))
    table = report.table(results)
    print(table)
    DOCS_DIR.mkdir(exist_ok=True)
    report.write_markdown(results, table, DOCS_DIR / "performance.md")
    subprocess.run([str(tools_python), str(BENCH_DIR / "plot.py"), str(results_file),
                    str(DOCS_DIR / "performance.png")], check=True, timeout=120)
    log(f"done in {time.monotonic() - began:.0f} s: docs/performance.md, docs/performance.png")


if __name__ == "__main__":
    main()
