"""Turns the benchmark's results into the printed table and docs/performance.md.

Targets are printed next to the measured figures with whether this run met
them; nothing here fails the run.
"""

import datetime
import os
import platform
import statistics

SERVERS = ("ec2metaproxy", "reference", "lyft", "trivial")
HEADERS = ("ec2metaproxy", "stdlib reference", "Lyft metadataproxy", "trivial (load-gen ceiling)")
DASH = "—"


def machine_info():
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rps(rounds):
    return median(r["rps"] for r in rounds)


def fmt(value, digits=0):
    if value is None:
        return DASH
    return f"{value:,.{digits}f}"


def rps_cell(rounds):
    values = [r["rps"] for r in rounds]
    return f"{fmt(median(values))} ({' / '.join(fmt(v) for v in values)})"


def latency_cell(rounds):
    return (f"{fmt(median(r['p50_ms'] for r in rounds), 2)} / {fmt(median(r['p99_ms'] for r in rounds), 2)}"
            f" ({fmt(max(r['max_ms'] for r in rounds), 0)})")


def calls_cell(rounds, key):
    total = {}
    for r in rounds:
        for name, count in r[key].items():
            total[name] = total.get(name, 0) + count
    if not total:
        return "0"
    return ", ".join(f"{count:,} {name}" for name, count in sorted(total.items()))


def met(condition):
    if condition is None:
        return "n/a"
    return "yes" if condition else "**no**"


def ratio(a, b):
    return a / b if a and b else None


def mode_rows(results, key, label):
    """Rows for one load mode: req/s, latency, ratios, errors."""
    mode = results[key]
    proxy = rps(mode["ec2metaproxy"])
    to_ref, to_lyft = ratio(proxy, rps(mode["reference"])), ratio(proxy, rps(mode["lyft"]))
    rows = [
        [f"{label}: req/s, median (rounds)"] + [rps_cell(mode[s]) for s in SERVERS] + ["", ""],
        [f"{label}: p50 / p99 ms (max)"] + [latency_cell(mode[s]) for s in SERVERS] + ["", ""],
        [f"{label}: ec2metaproxy req/s ÷ this", DASH, f"{fmt(to_ref, 2)}x", f"{fmt(to_lyft, 2)}x", DASH,
         "≥ 1.5x reference, ≥ 3x Lyft" if key == "new_connection" else "",
         f"ref {met(to_ref and to_ref >= 1.5)}, Lyft {met(to_lyft and to_lyft >= 3)}"
         if key == "new_connection" else ""],
        [f"{label}: server CPU ms per request"]
        + [fmt(median(r["server_cpu_ms_per_request"] for r in mode[s]), 3) for s in SERVERS] + ["", ""],
        [f"{label}: load generator's CPU use, % of one core"]
        + [fmt(median(r["cpu_percent"] for r in mode[s])) for s in SERVERS] + ["", ""],
        [f"{label}: failed requests"] + [fmt(sum(r["errors"] for r in mode[s])) for s in SERVERS] + ["", ""],
    ]
    return rows


def quiet_rows(results):
    rounds = {s: results["new_connection"][s] + results["keep_alive"][s] for s in SERVERS}
    rows = []
    for key, what in (("sts_calls", "STS"), ("docker_calls", "Docker")):
        cells = [calls_cell(rounds[s], key) for s in SERVERS[:3]]
        rows.append([f"{what} calls during the load (all timed windows)"] + cells +
                     [DASH, "0 (ec2metaproxy)", met(cells[0] == "0")])
    return rows


def first_rows(results):
    rows = []
    for key, label, p50_target in (("1.5", "1.5 s after the start event", 10),
                                   ("0.0", "right after the start event", 10),
                                   ("0.0+create0.05", "right after the start event, create event 50 ms "
                                                      "before it", 5)):
        cells = []
        for server in ("ec2metaproxy", "lyft"):
            entry = results["first_request"][server][key]
            lat = entry["latency"]
            failed = f", {entry['failed']} failed" if entry["failed"] else ""
            cells.append(f"{fmt(lat['p50'], 1)} / {fmt(lat['max'], 1)} (n={lat['n']}{failed})")
        proxy = results["first_request"]["ec2metaproxy"][key]
        ok = (proxy["failed"] == 0 and proxy["latency"]["p50"] < p50_target and proxy["latency"]["max"] < 100)
        rows.append([f"first request {label}: p50 / max ms",
                     cells[0], DASH, cells[1], DASH, f"p50 < {p50_target} ms, none > 100 ms", met(ok)])
    return rows


def sts_rows(results):
    entry = results["restart"]
    rate, _ = entry["sts_limit"]
    unavailable = entry["answers"].get("503", 0)
    asked = sum(entry["answers"].values())
    done = entry["all_credentials_s"]
    per_hour = results["calls_per_container_hour"]
    return [
        [f"host restart, {entry['containers']:,} containers, STS throttling above {rate:g}/s: "
         "every container has credentials after, s", fmt(done, 1) if done is not None else "not within the wait",
         DASH, DASH, DASH, f"≥ {entry['containers'] / rate:.0f} s (STS's budget)", ""],
        ["same restart: STS calls (throttled), highest calls in one second",
         f"{entry['sts_calls']:,} ({entry['throttled']:,}), {entry['max_calls_per_s']}/s", DASH, DASH, DASH, "", ""],
        ["same restart: a client's requests meanwhile answered 503",
         f"{unavailable:,} of {asked:,}", DASH, DASH, DASH, "", ""],
        ["hot path, new connection, admin listener on and scraped every second ÷ off: req/s, p99 "
         f"(medians of {len(results['admin']['on'])} alternating rounds; off rounds' req/s spread)",
         f"{ratio(rps(results['admin']['on']), rps(results['admin']['off'])):.3f}x, "
         f"{ratio(median(r['p99_ms'] for r in results['admin']['on']), median(r['p99_ms'] for r in results['admin']['off'])):.3f}x "
         f"({fmt(min(r['rps'] for r in results['admin']['off']))}–{fmt(max(r['rps'] for r in results['admin']['off']))})",
         DASH, DASH, DASH, "within noise (on ≥ the slowest off round)",
         met(rps(results['admin']['on']) >= min(r['rps'] for r in results['admin']['off']))],
        ["STS calls per container-hour, sessionScope container / role (simulated clock, 5 roles)",
         f"{per_hour['container']} / {per_hour['role']}", DASH, DASH, DASH, "", ""],
    ]


def pacing(entry):
    """STS calls at start-up as text, and whether they were paced (no burst).

    Paced: no single second had more than twice the median second's calls.
    """
    rates = entry["sts_per_second"]
    if not rates:
        return "0 calls", None
    busy = [r for r in rates if r]
    steady = statistics.median(busy)
    text = (f"{entry['sts_startup_calls']:,} calls over {entry['prefetch_s']:g} s, "
            f"median {steady:g}/s, max {max(rates)}/s")
    if not entry["prefetch_complete"]:
        text += " (stopped waiting before every container had credentials)"
    return text, max(rates) <= 2 * steady


def startup_cell(entry):
    refused = ", ".join(f"{count} x {answer}" for answer, count in sorted(entry["answers_before_serving"].items()))
    return (f"{fmt(entry['serving_s'], 3)} (port open after {fmt(entry['port_open_s'], 3)}"
            f"{'; before that: ' + refused if refused else ''})")


def scale_rows(results):
    rss_target = {1000: 80, 5000: 150}
    rows = [[f"{results['settings']['containers']} containers, after the hot-path load: VmRSS MB",
             fmt(results["hot_proxy_rss_mb"], 1), DASH, DASH, DASH, "", ""]]
    for entry in results["scale"]:
        n = entry["containers"]
        limit = rss_target.get(n)
        paced_text, paced = pacing(entry)
        lookup = entry["lookup"]
        docker = ", ".join(f"{c:,} {k}" for k, c in sorted(entry["docker_startup_calls"].items())) or "0"
        first = n == min(rss_target)
        rows += [
            [f"{n:,} containers: VmRSS MB, every container's credentials cached", fmt(entry["rss_mb"], 1),
             DASH, DASH, DASH, f"< {limit} MB" if limit else "", met(entry["rss_mb"] < limit) if limit else ""],
            [f"{n:,} containers: start-up until the last one gets credentials, s",
             startup_cell(entry), DASH, DASH, DASH,
             "< 1 s" if first else "", met(entry["serving_s"] < 1) if first else ""],
            [f"{n:,} containers: STS calls at start-up (one session per container)", paced_text,
             DASH, DASH, DASH, "paced (no second > 2x the median)" if first else "",
             met(paced) if first else ""],
            [f"{n:,} containers: Docker calls at start-up", docker, DASH, DASH, DASH, "", ""],
            [f"{n:,} containers: lookup p50 / p99 ms (n={lookup['n']}, cached)",
             f"{fmt(lookup['p50'], 2)} / {fmt(lookup['p99'], 2)}", DASH, DASH, DASH, "", ""],
        ]
    return rows


def table(results):
    """The one results table, as Markdown."""
    header = ["measurement", *HEADERS, "target", "met"]
    rows = (mode_rows(results, "new_connection", "hot path, new connection")
            + quiet_rows(results) + first_rows(results) + scale_rows(results) + sts_rows(results)
            + mode_rows(results, "keep_alive", "hot path, keep-alive"))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def venv_note(seconds):
    if seconds < 1:
        return "the bench venvs were already built"
    return f"{seconds:.0f} s of it building the bench venvs"


def write_markdown(results, table_text, path):
    m, s = results["machine"], results["settings"]
    per_second = "\n".join(
        f"- {e['containers']:,} containers: STS calls in each of the first 10 seconds after the proxy "
        f"started: {e['sts_per_second'][:10]}" for e in results["scale"])
    path.write_text(f"""# Performance

Measured by `{results['command']}`, which works from a fresh clone (it builds its
bench-only venvs under `bench/` on first use). This run: {m['date']}, {m['cpu']},
{m['cores']} cores (shared and noisy), Python {m['python']}, Linux {m['kernel']}. The whole run
took {results['wall_s']:.0f} s ({venv_note(results['venvs_ready_s'])}).

![requests/s and p99 latency](performance.png)

{table_text}

## How it was measured

All traffic stays on loopback.

- **Hot path**: `GET /latest/meta-data/iam/security-credentials/<role>` from {s['containers']}
  containers (source addresses 127.0.1.1–{s['containers']}, each asking for its own role),
  {s['concurrency']} concurrent clients, driven by `bench/loadgen.py` (one epoll loop over raw
  sockets, in its own process). Each server first gets 2 s of warm-up load. Then the servers
  are loaded in turn, {s['rounds']} alternating rounds of {s['seconds']:g} s, each after a 0.5 s
  warm-up. The figures are the median of the rounds, with each round in brackets; max is
  the slowest request of all rounds. "New connection" opens a connection per request;
  "keep-alive" reuses one for {s['keepalive_requests']} requests. The trivial asyncio server,
  loaded in the same rounds, shows the load generator's own ceiling on this machine.
- **Servers**:
  - `ec2metaproxy.py -c CONFIG`, its per-request log line going to a file.
  - A bare `http.server.ThreadingHTTPServer` with `BaseHTTPRequestHandler` answering the
    same credential JSON from memory (`bench/refserver.py`). It keeps the stdlib defaults
    but one: its listen backlog is raised from 5 to the proxy's 1024, because with 5 some
    SYNs are dropped under this load and retried after 1 s or more, which would count
    against it. Its log line also goes to a file.
  - Lyft's `metadataproxy` 2.2.0, run as its README says: `gunicorn metadataproxy:app
    --workers=2 -k gevent`. It takes roles from the containers' `IAM_ROLE` and reaches
    STS at moto through `AWS_ENDPOINT_URL_STS`. `AWS_REGION` is unset, and
    `AWS_DEFAULT_REGION` is set for boto3. Lyft inspects the container on the Docker
    stand-in for every request, and that stand-in's CPU time is not in Lyft's figure.
- **The stdlib reference with keep-alive**: it waits about 40 ms per request: `BaseHTTPRequestHandler` sends the headers and
  the body in two writes, and on a kept-alive connection the second write waits (Nagle) for
  the client's delayed ACK of the first. Its CPU time per request shows what it would do
  without that wait.
- **Correctness first**: before timing, every server answered all {s['containers']} containers,
  and STS's GetCallerIdentity with the first three credentials named `assumed-role/<role>/`.
- **Quiet path**: calls counted at the Docker stand-in and at the recording front of moto's
  STS, during the timed windows of both modes.
- **First request**: a container with a role not used before is added to the Docker
  stand-in (a start event goes out on `/events`). It asks for credentials
  {s['first_request_samples']} times 1.5 s after the event and {s['first_request_samples']} times right
  after it; {s['first_request_samples']} more times right after it, with the container's create event
  (its labels among the attributes, as Docker sends them) 50 ms before the start event.
- **Host restart under throttling**: the proxy starts with 1,000 running containers while the
  STS stand-in answers Throttling above a set rate (a token bucket, like an account's STS
  budget). One client asks random containers for credentials every 10 ms meanwhile. The
  time is until the last container's credentials were fetched.
- **Admin listener**: two proxies with the same 50 containers, one with `adminListen` and
  `/metrics` and `/readyz` scraped every second while it is loaded, in alternating rounds
  of the new-connection hot path (`bench/admin_overhead.py`, also runnable alone).
- **STS calls per container-hour**: `bench/fleet_sim.py`'s steady state for one host of 50
  containers over {results.get('sim_hours', 24)} simulated hours, with the proxy's own pacer and
  refresh schedule on a simulated clock (see docs/fleet.md).
- **Scale**: the proxy is started against 1,000 and then 5,000 containers sharing
  {s['scale_roles']} roles; ec2metaproxy assumes one STS session per container. Start-up is the
  time from process start until the last listed container gets its credentials, asking
  again after any refusal (listed in the row). The proxy is then left until every container
  has its credentials, with the STS calls per second counted at the recording front. RSS is
  `VmRSS` from `/proc/PID/status` at that point, and lookups are single requests from
  random containers after it.
- **CPU ms per request**: the server's user + system CPU time (all its processes, from
  `/proc/PID/stat`) over a timed window, divided by the requests answered in it.

{per_second}

The raw numbers of this run are in `bench/out/results.json` and the server logs in
`bench/out/logs/` (neither is committed). To see where the proxy's CPU time goes on the
hot path, run `python3 bench/cpu_profile.py` (py-spy, GIL-holding samples, per request).
""", encoding="utf-8")
