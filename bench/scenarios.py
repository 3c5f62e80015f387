"""The measurements of the benchmark, each a function returning plain data.

All traffic stays on loopback: containers are source addresses in 127/8;
the stand-ins (Docker Engine on a unix socket, moto's STS behind a
recording front, host IMDS) come from the project's test module.
"""

import collections
import json
import random
import secrets
import subprocess
import sys
import time
from pathlib import Path

import boto3

from loadgen import percentiles_ms
from servers import arn, clean_env, get_credentials

BENCH_DIR = Path(__file__).resolve().parent
ROLE_LABEL = "ec2metaproxy.RoleAlias"
HOT_CONTAINERS = 50
CONCURRENCY = 16


def hot_ip(n):
    """Source address of hot-path container n (1..50)."""
    return f"127.0.1.{n}"


def hot_role(n):
    return f"role{n:02d}"


def container_args(role):
    """Labels and env that give a container its role in both proxies."""
    return {"labels": {ROLE_LABEL: role}, "env": [f"IAM_ROLE={role}", "PATH=/bin"]}


def snapshot(counter):
    """A copy of a Counter that other threads are updating."""
    return collections.Counter(dict(counter))


def sts_client(sts_url, **credentials):
    credentials = credentials or {"aws_access_key_id": "testing",
                                  "aws_secret_access_key": "testing"}
    return boto3.client("sts", endpoint_url=sts_url, region_name="us-east-1", **credentials)


def assumed_credentials(sts_url, roles):
    """{role: IMDS-shaped credentials} straight from STS, for the reference server."""
    client = sts_client(sts_url)
    result = {}
    for role in roles:
        creds = client.assume_role(RoleArn=arn(role),
                                   RoleSessionName="bench")["Credentials"]
        result[role] = {
            "Code": "Success",
            "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "Type": "AWS-HMAC",
            "AccessKeyId": creds["AccessKeyId"],
            "SecretAccessKey": creds["SecretAccessKey"],
            "Token": creds["SessionToken"],
            "Expiration": creds["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    return result


def answer_when_ready(port, ip, role, timeout=15.0):
    """GET ip's credentials, asking again while the server answers 503 (STS
    not done yet), for at most timeout.  Returns (status, body, 503s seen)."""
    deadline, unavailable = time.monotonic() + timeout, 0
    while True:
        status, body, _ = get_credentials(port, ip, role, timeout=timeout)
        if status != 503 or time.monotonic() > deadline:
            return status, body, unavailable
        unavailable += 1
        time.sleep(0.05)


def check_answers(port, sts_url, identity_checks=3):
    """Every hot container gets its own role; a few credentials work at STS.

    Raises RuntimeError on the first wrong answer, so a broken server is
    never timed.  Returns the identity ARNs STS reported and how many 503
    answers came before the credentials were ready.
    """
    arns, unavailable = [], 0
    for n in range(1, HOT_CONTAINERS + 1):
        status, body, waits = answer_when_ready(port, hot_ip(n), hot_role(n))
        unavailable += waits
        if status != 200 or not body or "AccessKeyId" not in body:
            raise RuntimeError(f"port {port}: {hot_role(n)} from {hot_ip(n)} got HTTP {status}")
        if n <= identity_checks:
            client = sts_client(sts_url, aws_access_key_id=body["AccessKeyId"],
                                aws_secret_access_key=body["SecretAccessKey"],
                                aws_session_token=body["Token"])
            arn = client.get_caller_identity()["Arn"]
            if f":assumed-role/{hot_role(n)}/" not in arn:
                raise RuntimeError(f"port {port}: credentials for {hot_role(n)} are {arn}")
            arns.append(arn)
    return {"arns": arns, "unavailable_before_ready": unavailable}


def run_loadgen(port, seconds, per_connection):
    """Run the load-generator process once; return its JSON summary."""
    argv = [sys.executable, str(BENCH_DIR / "loadgen.py"), "--port", str(port),
            "--count", str(HOT_CONTAINERS), "--concurrency", str(CONCURRENCY),
            "--per-connection", str(per_connection), "--duration", str(seconds)]
    done = subprocess.run(argv, capture_output=True, text=True, env=clean_env(),
                          timeout=seconds + 60, check=True)
    return json.loads(done.stdout)


def alternate_rounds(servers, standins, rounds, seconds, per_connection, log):
    """Load each server in turn (A,B,C,A,B,C...) and count stand-in calls per window.

    servers: {name: Server}.  Each timed window follows a 0.5 s warm-up run,
    so caches are as a long-running server has them.  Returns {name: [one
    loadgen summary per round, plus the stand-in calls and the server's CPU
    time per request in that window]}.
    """
    results = {name: [] for name in servers}
    for round_no in range(1, rounds + 1):
        for name, server in servers.items():
            run_loadgen(server.port, 0.5, per_connection)
            sts_before = snapshot(standins.sts.calls)
            docker_before = snapshot(standins.docker.calls)
            cpu_before = server.cpu_seconds()
            result = run_loadgen(server.port, seconds, per_connection)
            cpu = server.cpu_seconds() - cpu_before
            result["server_cpu_ms_per_request"] = round(1000 * cpu / max(result["requests"], 1), 3)
            result["sts_calls"] = dict(snapshot(standins.sts.calls) - sts_before)
            result["docker_calls"] = dict(snapshot(standins.docker.calls) - docker_before)
            results[name].append(result)
            log(f"  round {round_no} {name}: {result['rps']:.0f} req/s, p99 {result['p99_ms']} ms, "
                f"server CPU {result['server_cpu_ms_per_request']} ms/req, "
                f"load-gen CPU {result['cpu_percent']}%, errors {result['errors']}")
    return results


def first_request_key(delay, create_gap):
    return f"{delay}" if create_gap is None else f"{delay}+create{create_gap}"


def first_requests(port, docker, samples, log):
    """Latency of new containers' first credential requests.

    samples: [(delay s, create gap s or None, role, source address)].  For
    each, a container with that role and address is added to the Docker
    stand-in (which emits its start event; with a create gap, a create event
    with its labels goes out that long before) and asks for credentials
    `delay` seconds after the start.  Returns {first_request_key: {"latency":
    percentiles, "failed": non-200 count}}.
    """
    latencies = collections.defaultdict(list)
    failed = collections.Counter()
    for delay, create_gap, role, ip in samples:
        args, container_id = container_args(role), secrets.token_hex(32)
        if create_gap is not None:
            attributes = dict(args["labels"], name=f"late-{ip}", image="busybox:latest")
            docker.emit({"Type": "container", "Action": "create", "id": container_id, "status": "create",
                         "Actor": {"ID": container_id, "Attributes": attributes}})
            time.sleep(create_gap)
        docker.add_container(f"late-{ip}", [ip], container_id=container_id, **args)
        time.sleep(delay)
        status, _, elapsed = get_credentials(port, ip, role, timeout=10)
        key = first_request_key(delay, create_gap)
        latencies[key].append(elapsed)
        failed[key] += status != 200
        log(f"  first request {key} s after start: {elapsed * 1000:.1f} ms, HTTP {status}")
    return {key: {"latency": percentiles_ms(values), "failed": failed[key]} for key, values in latencies.items()}


def scale_ip(index):
    """Source address of scale container index (0-based), 250 per /24."""
    return f"127.1.{index // 250}.{index % 250 + 1}"


def scale_role(index, roles):
    return f"srole{index % roles:03d}"


def wait_serving(server, ip, role, timeout):
    """Ask for ip's credentials from the process start until they come.

    Returns (seconds until the port accepted connections, seconds until the
    credentials came, answers other than 200 before them).
    """
    deadline = time.monotonic() + timeout
    server.wait_listening(timeout)
    port_open = time.monotonic() - server.started_at
    refused = collections.Counter()
    while time.monotonic() < deadline:
        try:
            status, _, _ = get_credentials(server.port, ip, role, timeout=5)
        except OSError as exc:
            refused[type(exc).__name__] += 1
        else:
            if status == 200:
                return port_open, time.monotonic() - server.started_at, dict(refused)
            refused[f"HTTP {status}"] += 1
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited; see {server.log_path}")
        time.sleep(0.005)
    raise RuntimeError(f"{server.name}: no credentials for {ip} after {timeout}s")


def wait_for_calls(call_times, mark, wanted, timeout, log):
    """Wait until `wanted` STS calls were made after index mark, or STS has been
    quiet for 3 s, or timeout.  Returns whether all wanted calls were made."""
    began = time.monotonic()
    deadline, note = began + timeout, began + 15
    while time.monotonic() < deadline:
        made = len(call_times) - mark
        if made >= wanted:
            return True
        if made and time.monotonic() - call_times[-1] > 3:
            return False
        if time.monotonic() > note:
            log(f"  ... {made} of {wanted} STS calls made")
            note += 15
        time.sleep(0.2)
    return False


def per_second(times, origin):
    """Calls in each whole second since origin: [calls in s0, calls in s1, ...]."""
    buckets = collections.Counter(int(t - origin) for t in times if t >= origin)
    return [buckets.get(second, 0) for second in range(max(buckets, default=-1) + 1)]


def scale_run(count, roles, standins, new_proxy, log, lookups=300):
    """Start the proxy against `count` containers and measure it.

    standins.docker must hold exactly those containers; new_proxy() returns
    an unstarted Server.  Measures: time from process start until its port
    accepts connections and until the last listed container's credentials
    come (asking again after a 503 or other refusal); the STS calls of the
    start-up prefetch (one session per container) per second, until every
    container has credentials; Docker calls; VmRSS then; and the latency of
    single requests from random containers once everything is cached.
    """
    sts_times = standins.sts_times
    sts_mark, docker_before = len(sts_times), snapshot(standins.docker.calls)
    with new_proxy() as server:
        last = count - 1
        port_open, serving, refused = wait_serving(server, scale_ip(last), scale_role(last, roles), timeout=60)
        log(f"  {count} containers: port open after {port_open:.3f} s, credentials after {serving:.3f} s "
            f"(earlier answers: {refused or 'none'}); waiting for the prefetch")
        complete = wait_for_calls(sts_times, sts_mark, count, count / 20 + 30, log)
        startup_calls = list(sts_times[sts_mark:])
        docker_calls = dict(snapshot(standins.docker.calls) - docker_before)
        rss_after_prefetch = server.rss_mb()
        sample = random.Random(count).sample(range(count), min(lookups, count))
        timings = []
        for index in sample:
            status, _, elapsed = get_credentials(server.port, scale_ip(index), scale_role(index, roles))
            if status != 200:
                raise RuntimeError(f"scale {count}: container {index} got HTTP {status}")
            timings.append(elapsed)
        rss = max(rss_after_prefetch, server.rss_mb())
        rates = per_second(startup_calls, server.started_at)
        return {
            "containers": count, "roles": roles,
            "port_open_s": round(port_open, 3),
            "serving_s": round(serving, 3),
            "answers_before_serving": refused,
            "sts_startup_calls": len(startup_calls),
            "prefetch_complete": complete,
            "prefetch_s": round(startup_calls[-1] - server.started_at, 1) if startup_calls else 0.0,
            "sts_per_second": rates,
            "docker_startup_calls": docker_calls,
            "lookup": percentiles_ms(timings),
            "rss_mb": round(rss, 1),
        }


def restart_under_throttling(count, roles, standins, new_proxy, log, poll_interval=0.01):
    """A host restart: the proxy starts with `count` running containers while STS throttles
    above a set rate (standins.sts.limit).  Meanwhile one client asks random containers for
    credentials every poll_interval.  Measures the time until every container has credentials
    (the last of `count` successful AssumeRole calls), the highest rate of calls STS saw in any
    second (throttled ones included), and the client's answers by status.
    """
    sts = standins.sts
    call_mark, throttled_mark = len(sts.call_times), len(sts.throttled_times)
    answers = collections.Counter()
    rng = random.Random(count)
    with new_proxy() as server:
        server.wait_listening(60)
        deadline = time.monotonic() + count / sts.limit[0] * 4 + 60
        while time.monotonic() < deadline:
            calls = len(sts.call_times) - call_mark
            throttled = len(sts.throttled_times) - throttled_mark
            if calls - throttled >= count:
                break
            index = rng.randrange(count)
            try:
                status, _, _ = get_credentials(server.port, scale_ip(index), scale_role(index, roles), timeout=5)
            except OSError as exc:
                answers[type(exc).__name__] += 1
            else:
                answers[status] += 1
            time.sleep(poll_interval)
        calls = list(sts.call_times[call_mark:])
        throttled = len(sts.throttled_times) - throttled_mark
        done = len(calls) - throttled >= count
        all_credentials_s = calls[-1] - server.started_at if done and calls else None
        rates = per_second(calls, server.started_at)
        log(f"  restart, {count} containers, STS limited to {sts.limit[0]:g}/s: every container has credentials "
            f"after {all_credentials_s} s; {len(calls)} calls, {throttled} throttled; answers {dict(answers)}")
        return {"containers": count, "sts_limit": list(sts.limit), "all_credentials_s": all_credentials_s,
                "sts_calls": len(calls), "throttled": throttled, "max_calls_per_s": max(rates, default=0),
                "sts_per_second": rates, "answers": {str(k): v for k, v in answers.items()}}
