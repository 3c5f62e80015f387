"""Closed-loop HTTP/1.1 load generator for the credential hot path.

Runs as its own process so that its CPU use is visible and separate from the
server under test.  It drives ``--concurrency`` client slots from one epoll
loop over raw non-blocking sockets (no asyncio, no http.client) to keep its
own cost per request small.  Each slot plays one container at a time: the
socket is bound to that container's source address and asks for that
container's role.  With ``--per-connection 1`` every request uses a new
connection; with a larger value a connection is reused (HTTP/1.1 keep-alive)
for that many requests before the slot moves on to the next container.

The run is bounded by ``--duration`` seconds and ``--max-requests``; a
request slower than ``--timeout`` counts as an error.  One JSON object with
the counts and latency percentiles is printed to stdout.
"""

import argparse
import errno
import json
import resource
import select
import socket
import time

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
PATH = "/latest/meta-data/iam/security-credentials/{role}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--containers", default="127.0.1.{n}=role{n:02d}",
                        help="source address = role template, n from 1")
    parser.add_argument("--count", type=int, default=50,
                        help="number of containers")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--per-connection", type=int, default=1,
                        help="requests per connection (1 = new connection)")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=5.0)
    return parser.parse_args(argv)


def containers(template, count):
    """Return [(source address, request bytes)] for containers 1..count."""
    addr_tpl, role_tpl = template.split("=", 1)
    result = []
    for n in range(1, count + 1):
        path = PATH.format(role=role_tpl.format(n=n))
        result.append((addr_tpl.format(n=n), path))
    return result


def request_bytes(path, host, keep_alive):
    connection = "keep-alive" if keep_alive else "close"
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"User-Agent: bench-loadgen\r\nAccept: */*\r\n"
            f"Connection: {connection}\r\n\r\n").encode()


def parse_response(buf):
    """Return (status, keep_alive, total length) once headers are in buf."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1").split("\r\n")
    version, status = head[0].split(" ", 2)[:2]
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    length = int(headers.get("content-length", "-1"))
    keep_alive = headers.get("connection") != "close" and (
        version == "HTTP/1.1" or headers.get("connection") == "keep-alive")
    return int(status), keep_alive, (end + 4 + length) if length >= 0 else -1


def percentiles_ms(seconds):
    """Count, p50, p99 and max of durations given in seconds; results in ms."""
    values = sorted(seconds)
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}

    def at(fraction):
        return round(values[min(len(values) - 1, int(fraction * len(values)))] * 1000, 3)

    return {"n": len(values), "p50": at(0.5), "p99": at(0.99), "max": round(values[-1] * 1000, 3)}


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Slot:
    """One concurrent client: a socket and the request in flight on it."""

    def __init__(self, first_container):
        self.sock = None
        self.left = 0          # requests still allowed on this connection
        self.container = first_container   # index of the next container to play
        self.buf = b""
        self.started = 0.0
        self.request = b""


class LoadGenerator:
    """Epoll loop that keeps every slot busy until the run is over."""

    def __init__(self, args):
        self.args = args
        self.targets = [
            (addr, request_bytes(path, args.host, args.per_connection > 1))
            for addr, path in containers(args.containers, args.count)]
        self.epoll = select.epoll()
        self.by_fd = {}
        self.latencies = []
        self.errors = 0
        self.error_samples = []
        self.connections = 0
        self.issued = 0
        self.stop_at = 0.0
        self.last_done = 0.0
        self.ready = []        # slots waiting to start their next request

    def run(self):
        slots = [Slot(i) for i in range(self.args.concurrency)]
        began = time.perf_counter()
        cpu_began = cpu_seconds()
        self.stop_at = began + self.args.duration
        self.ready = list(slots)
        while time.perf_counter() < self.stop_at + self.args.timeout:
            ready, self.ready = self.ready, []
            for slot in ready:
                self.next_request(slot)
            if not self.by_fd:
                break
            for fd, events in self.epoll.poll(0 if self.ready else 0.05):
                slot = self.by_fd.get(fd)
                if slot is not None:
                    self.on_event(slot, events)
            self.expire(time.perf_counter())
        for slot in list(self.by_fd.values()):
            self.drop(slot)
        cpu = cpu_seconds() - cpu_began
        summary = self.summary(max(self.last_done - began, 1e-9))
        summary["cpu_percent"] = round(100 * cpu / (time.perf_counter() - began), 1)
        return summary

    def next_request(self, slot):
        now = time.perf_counter()
        if now >= self.stop_at or self.issued >= self.args.max_requests:
            self.drop(slot)
            return
        self.issued += 1
        slot.buf = b""
        slot.started = now
        if slot.sock is None or slot.left <= 0:
            self.drop(slot)
            self.connect(slot)
        else:
            self.send(slot)

    def connect(self, slot):
        addr, slot.request = self.targets[slot.container % len(self.targets)]
        slot.container += self.args.concurrency
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setblocking(False)
        slot.sock, slot.left = sock, self.args.per_connection
        self.connections += 1
        self.by_fd[sock.fileno()] = slot
        try:
            sock.bind((addr, 0))
            err = sock.connect_ex((self.args.host, self.args.port))
        except OSError as exc:
            err = exc.errno
        if err not in (0, errno.EINPROGRESS):
            self.epoll.register(sock.fileno(), 0)
            self.fail(slot, f"connect: {errno.errorcode.get(err, err)}")
            return
        self.epoll.register(sock.fileno(), select.EPOLLOUT)

    def send(self, slot):
        slot.left -= 1
        try:
            slot.sock.send(slot.request)
        except OSError as exc:
            self.fail(slot, f"send: {exc}")
            return
        self.epoll.modify(slot.sock.fileno(), select.EPOLLIN)

    def on_event(self, slot, events):
        if events & select.EPOLLOUT:
            err = slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(slot, f"connect: {errno.errorcode.get(err, err)}")
            else:
                self.send(slot)
            return
        try:
            data = slot.sock.recv(65536)
        except OSError as exc:
            self.fail(slot, f"recv: {exc}")
            return
        if not data:
            self.fail(slot, "closed before a full response")
            return
        slot.buf += data
        self.check_complete(slot)

    def check_complete(self, slot):
        parsed = parse_response(slot.buf)
        if parsed is None:
            return
        status, keep_alive, total = parsed
        if total < 0:
            self.fail(slot, "no Content-Length")
            return
        if len(slot.buf) < total:
            return
        if status != 200 or b"AccessKeyId" not in slot.buf:
            self.fail(slot, f"status {status}")
            return
        self.last_done = time.perf_counter()
        self.latencies.append(self.last_done - slot.started)
        if not keep_alive:
            slot.left = 0
        self.ready.append(slot)

    def fail(self, slot, reason):
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(reason)
        slot.left = 0
        self.drop(slot)
        self.ready.append(slot)

    def expire(self, now):
        for slot in list(self.by_fd.values()):
            if now - slot.started > self.args.timeout:
                self.fail(slot, "timeout")

    def drop(self, slot):
        if slot.sock is not None:
            fd = slot.sock.fileno()
            self.by_fd.pop(fd, None)
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass
            slot.sock.close()
            slot.sock = None

    def summary(self, elapsed):
        latency = percentiles_ms(self.latencies)
        return {"requests": latency["n"], "errors": self.errors,
                "error_samples": self.error_samples,
                "connections": self.connections,
                "elapsed_s": round(elapsed, 3),
                "rps": round(latency["n"] / elapsed, 1),
                "p50_ms": latency["p50"], "p99_ms": latency["p99"], "max_ms": latency["max"]}


def main(argv=None):
    args = parse_args(argv)
    print(json.dumps(LoadGenerator(args).run()))


if __name__ == "__main__":
    main()
