"""Where ec2metaproxy's CPU time goes on the credential hot path.

    python3 bench/cpu_profile.py [--seconds 8] [--per-connection 1]

Starts the stand-ins and the proxy with the benchmark's 50 containers,
loads it like the hot path (16 concurrent clients, a new connection per
request unless --per-connection says otherwise) and samples it with py-spy
in --gil mode, so only the thread holding the GIL is counted: that is where
the CPU time of this GIL-bound server goes.  Prints the server's CPU time
per request and the functions with the largest share of it.
"""

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

import scenarios as sc  # noqa: E402
import servers as srv  # noqa: E402
import venvs  # noqa: E402
from standins import StandIns  # noqa: E402
from test_ec2metaproxy import free_port  # noqa: E402

OUT_DIR = BENCH_DIR / "out" / "profile"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--per-connection", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    return parser.parse_args()


def frame_name(frame):
    """'handle (/path/to/ec2metaproxy.py:1872)' -> 'handle (ec2metaproxy.py)'."""
    return re.sub(r" \((?:.*/)?([^/:]+)(?::\d+)?\)$", r" (\1)", frame)


def shares(raw_file):
    """Inclusive and self sample counts per function from py-spy's raw output."""
    inclusive, own, total = collections.Counter(), collections.Counter(), 0
    for line in raw_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames or not count.isdigit():
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    return inclusive, own, total


def profile(args, py_spy):
    raw_file = OUT_DIR / "py-spy.raw"
    with StandIns(OUT_DIR / "docker.sock") as standins:
        roles = [sc.hot_role(n) for n in range(1, sc.HOT_CONTAINERS + 1)]
        for n in range(1, sc.HOT_CONTAINERS + 1):
            standins.docker.add_container(f"hot{n:02d}", [sc.hot_ip(n)], **sc.container_args(roles[n - 1]))
        port = free_port()
        config = srv.write_proxy_config(OUT_DIR / "proxy.json", port, roles, standins.docker_socket,
                                        standins.imds.url, standins.sts.url)
        with srv.proxy_server(config, port, OUT_DIR / "ec2metaproxy.log") as proxy:
            proxy.wait_listening()
            sc.check_answers(port, standins.sts.url, identity_checks=0)
            sc.run_loadgen(port, 1.0, args.per_connection)
            cpu_before = proxy.cpu_seconds()
            spy = subprocess.Popen([str(py_spy), "record", "--pid", str(proxy.proc.pid), "--gil",
                                    "--rate", "1000", "--duration", str(int(args.seconds)),
                                    "--format", "raw", "--output", str(raw_file)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(0.5)
                load = sc.run_loadgen(port, args.seconds, args.per_connection)
                cpu = proxy.cpu_seconds() - cpu_before
            finally:
                _, errors = spy.communicate(timeout=args.seconds + 60)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {errors.decode()[-500:]}")
    return load, cpu, raw_file


def main():
    args = parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    python = venvs.ensure_venv(venvs.TOOLS_VENV, venvs.TOOLS_STEPS, print)
    load, cpu, raw_file = profile(args, python.parent / "py-spy")
    per_request_us = 1e6 * cpu / max(load["requests"], 1)
    inclusive, own, total = shares(raw_file)
    print(f"{load['rps']:.0f} req/s, p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms; "
          f"server CPU {per_request_us:.0f} us per request; {total} GIL-holding samples")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title:>9}  us/req  function")
        for name, count in counter.most_common(args.top):
            print(f"{100 * count / total:8.1f}%  {per_request_us * count / total:6.0f}  {name}")


if __name__ == "__main__":
    main()
