"""Instructions the proxy spends per hot-path request, counted by callgrind: repeatable where
timings are not (these machines are shared and noisy), so two versions can be compared.

    python3 bench/instructions.py [--requests 1000] [--per-connection 1] [--clients 1]
                                  [--cache-sim] FILE [FILE ...]

Each FILE (an ec2metaproxy.py, this one or another version's) runs under valgrind with the
benchmark's 50 containers and their stand-ins. After a warm-up, instrumentation is switched
on for exactly --requests credential requests (a new connection per request unless
--per-connection says otherwise, from --clients threads), then off. Prints instructions per
request, and with --cache-sim the simulated cache misses and mispredicted branches too
(those explain a gap in time that the instruction count does not). Needs valgrind
(Debian's package); traffic stays on loopback.
"""

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

import scenarios as sc  # noqa: E402
import servers as srv  # noqa: E402
from standins import StandIns  # noqa: E402
from test_ec2metaproxy import free_port  # noqa: E402

OUT_DIR = BENCH_DIR / "out" / "instructions"
WARM_UP = 200


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--per-connection", type=int, default=1)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--cache-sim", action="store_true")
    return parser.parse_args()


def ask(port, count, per_connection, first=0):
    """count credential requests, round-robin over the 50 containers; each must be 200."""
    done, number = 0, first
    while done < count:
        container = number % sc.HOT_CONTAINERS + 1
        number += 1
        with socket.create_connection(("127.0.0.1", port), 30, source_address=(sc.hot_ip(container), 0)) as sock:
            reader = sock.makefile("rb")
            for _ in range(min(per_connection, count - done)):
                sock.sendall(f"GET {srv.CREDENTIALS_PATH.format(role=sc.hot_role(container))} HTTP/1.1\r\n"
                             f"Host: 169.254.169.254\r\n\r\n".encode())
                status = reader.readline()
                if b" 200 " not in status:
                    raise RuntimeError(f"answered {status!r}")
                length = 0
                for line in iter(reader.readline, b"\r\n"):
                    if not line:
                        raise RuntimeError("connection closed mid-answer")
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)
                done += 1


def wait_answering(port, deadline):
    while True:
        try:
            for container in range(1, sc.HOT_CONTAINERS + 1):
                status, _, _ = srv.get_credentials(port, sc.hot_ip(container), sc.hot_role(container), timeout=30)
                if status != 200:
                    raise RuntimeError(status)
            return
        except (OSError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def totals(dump_files):
    """Event name -> total over callgrind's dump files."""
    summed = {}
    for path in dump_files:
        events = []
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("totals:"):
                for name, value in zip(events, line.split()[1:]):
                    summed[name] = summed.get(name, 0) + int(value)
                break
    return summed


def count(standins, file, number, args):
    port = free_port()
    config = srv.write_proxy_config(OUT_DIR / f"config{number}.json", port,
                                    [sc.hot_role(n) for n in range(1, sc.HOT_CONTAINERS + 1)],
                                    standins.docker_socket, standins.imds.url, standins.sts.url)
    dump = OUT_DIR / f"callgrind{number}.out"
    for old in OUT_DIR.glob(f"callgrind{number}.out*"):
        old.unlink()
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}"]
    if args.cache_sim:
        argv += ["--cache-sim=yes", "--branch-sim=yes"]
    argv += [sys.executable, str(Path(file).resolve()), "-c", str(config)]
    with open(OUT_DIR / f"proxy{number}.log", "wb") as log:
        proc = subprocess.Popen(argv, env=srv.clean_env(**srv.AWS_TEST_ENV), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_answering(port, time.monotonic() + 300)
        ask(port, WARM_UP, args.per_connection)
        time.sleep(1)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        share = args.requests // args.clients
        clients = [threading.Thread(target=ask, args=(port, share, args.per_connection, client * 7))
                   for client in range(args.clients)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(600)
        time.sleep(1)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(60)
    summed = totals(sorted(OUT_DIR.glob(f"callgrind{number}.out*")))
    return {name: value / (share * args.clients) for name, value in summed.items()}


def main():
    args = parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    names = {"Ir": "instructions", "I1mr": "instruction-cache misses", "D1mr": "data-cache read misses",
             "Bcm": "mispredicted branches", "Bim": "mispredicted indirect jumps"}
    with StandIns(OUT_DIR / "docker.sock") as standins:
        for n in range(1, sc.HOT_CONTAINERS + 1):
            standins.docker.add_container(f"hot{n:02d}", [sc.hot_ip(n)], **sc.container_args(sc.hot_role(n)))
        for number, file in enumerate(args.files):
            per_request = count(standins, file, number, args)
            shown = ", ".join(f"{per_request[key]:,.0f} {label}" for key, label in names.items() if key in per_request)
            print(f"{file}: per request ({args.requests} requests, {args.per_connection} per connection, "
                  f"{args.clients} at once): {shown}", flush=True)


if __name__ == "__main__":
    main()
