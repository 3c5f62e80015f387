"""Fleet simulation: STS AssumeRole calls of many proxies sharing one account's STS budget.

    python3 bench/fleet_sim.py                      # 10,000 hosts x 50 containers, every scenario
    python3 bench/fleet_sim.py --hosts 100 --plot docs/fleet.png

A discrete-event simulation on a simulated clock (nothing sleeps, nothing is sent
anywhere). Each host runs the proxy's own pacing and refresh schedule, imported from
ec2metaproxy.py: StsPacer (the AIMD token bucket every AssumeRole call goes through),
refresh_time (when a session is refreshed, with its jitter) and retry_delay with the
cache's retry cap (when a throttled call is tried again). The simulated STS is one token
bucket for the whole account and region that answers Throttling when empty; AWS does
not publish its size, so its rate and burst are parameters (--sts-rate, --sts-burst).

Scenarios, each for both session scopes ("container": one session per container;
"role": containers of one role on one host share a session):
- steady: every container has long been running; sessions refresh on their schedule;
- deploy: a rolling deploy replaces every container once within the hour;
- restart: every host restarts within --restart-window seconds (an AMI roll), so every
  host asks for all its sessions at once.

Prints one table (calls, peak and mean calls/s, throttles, containers without
credentials, time until every container has credentials) and, with --plot, draws calls
per second and containers without credentials over time into a PNG (matplotlib comes
from the bench-only tools venv, see bench/venvs.py).
"""

import argparse
import heapq
import inspect
import itertools
import math
import json
import random
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

import ec2metaproxy  # noqa: E402
from ec2metaproxy import (CredentialCache, CredentialError, StsPacer, refresh_time,  # noqa: E402
                          retry_delay)

RETRY_CAP = inspect.signature(CredentialCache).parameters["retry_cap"].default
PACER_DEFAULTS = {name: p.default for name, p in inspect.signature(StsPacer).parameters.items()}
THROTTLING = CredentialError("Throttling", "Rate exceeded")
THROTTLED, OK = 0, 1


class SimClock:
    """The simulated time every host's pacer reads."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class AccountSts:
    """One account's STS in one region: a token bucket that answers Throttling when empty."""

    def __init__(self, rate, burst):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, 0.0

    def call(self, now):
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return OK
        return THROTTLED


class Timeline:
    """Per-second counts: calls, throttled calls, and changes in containers without credentials."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.calls = [0] * seconds
        self.throttled = [0] * seconds
        self.missing_delta = [0] * (seconds + 1)

    def slot(self, t):
        return min(max(int(t), 0), self.seconds - 1)

    def missing(self, start, end, count):
        """count containers were without credentials from start to end (None: still at the end)."""
        self.missing_delta[self.slot(start)] += count
        if end is not None and end < self.seconds:
            self.missing_delta[self.slot(end)] -= count

    def missing_series(self):
        series, level = [], 0
        for delta in self.missing_delta[:self.seconds]:
            level += delta
            series.append(level)
        return series


class Session:
    __slots__ = ("host", "containers", "expiration", "failures", "needed_since", "alive")

    def __init__(self, host, containers):
        self.host = host
        self.containers = containers
        self.expiration = None      # of the credentials it holds (None: none yet)
        self.failures = 0
        self.needed_since = None    # when its containers lost (or never had) credentials
        self.alive = True


class Replacement:
    """A container replaced (a rolling deploy): its session ends, a new one needs credentials."""

    __slots__ = ("old", "host", "alive")

    def __init__(self, old):
        self.old, self.host, self.alive = old, old.host, True


class Host:
    __slots__ = ("pacer", "due", "wake_at")

    def __init__(self, pacer):
        self.pacer = pacer
        self.due = []               # heap of (time, seq, session or replacement)
        self.wake_at = math.inf     # when the host is next on the fleet's heap


class Fleet:
    """The simulation: every host's pacer and due work, one account STS, one heap of host wake-ups.

    A host is on the fleet's heap once, at the time its pacer or its earliest due
    fetch names; a host whose pacer has no token yet costs one heap entry, however
    much work waits behind it.
    """

    def __init__(self, args, scope, seconds, seed):
        self.args, self.scope = args, scope
        self.clock = SimClock()
        self.sts = AccountSts(args.sts_rate, args.sts_burst)
        self.timeline = Timeline(seconds)
        self.heap = []              # (time, seq, host)
        self.seq = itertools.count()
        self.rng = random.Random(seed)
        random.seed(seed)           # retry_delay's jitter draws from the module's generator
        self.draw = self.rng.random
        self.hosts = []
        self.sessions = []          # per host: its sessions

    def add_host(self):
        args = self.args
        pacer = StsPacer(args.host_rate, args.host_burst, floor=args.host_floor, quiet=args.host_quiet,
                         clock=self.clock)
        self.hosts.append(Host(pacer))
        index = len(self.hosts) - 1
        self.sessions.append([Session(index, size) for size in self.session_sizes()])
        return self.sessions[index]

    def session_sizes(self):
        containers, roles = self.args.containers, self.args.roles
        if self.scope == "container":
            return [1] * containers
        return [containers // roles + (1 if index < containers % roles else 0) for index in range(roles)]

    def wake(self, host, when):
        if when < host.wake_at:
            host.wake_at = when
            heapq.heappush(self.heap, (when, next(self.seq), host))

    def schedule(self, item, when):
        host = self.hosts[item.host]
        heapq.heappush(host.due, (when, next(self.seq), item))
        self.wake(host, when)

    def need(self, session, when):
        """The session's containers have no credentials from `when`; fetch at once."""
        session.needed_since = when
        session.expiration = None
        self.schedule(session, when)

    def run(self):
        heap, clock, seconds = self.heap, self.clock, self.timeline.seconds
        while heap:
            when, _, host = heapq.heappop(heap)
            if when >= seconds:
                break
            if when != host.wake_at:
                continue   # superseded by an earlier wake-up
            clock.now = when
            self.serve(host, when)
        for host_sessions in self.sessions:
            for session in host_sessions:
                if session.alive and session.needed_since is not None:
                    self.timeline.missing(session.needed_since, None, session.containers)

    def serve(self, host, now):
        """What the proxy's release loop does: due work, each call through the pacer."""
        due = host.due
        host.wake_at = -math.inf   # being served: what it schedules meanwhile needs no wake-up of its own
        while due:
            when, _, item = due[0]
            if when > now:
                host.wake_at = math.inf
                self.wake(host, when)
                return
            if not item.alive:
                heapq.heappop(due)
                continue
            if type(item) is Replacement:
                heapq.heappop(due)
                self.replace(item.old, now)   # a container start takes no STS token
                continue
            pause = host.pacer.take()
            if pause > 0:
                host.wake_at = math.inf
                self.wake(host, now + pause)
                return
            heapq.heappop(due)
            self.call(host, item, now)
        host.wake_at = math.inf

    def replace(self, old, now):
        old.alive = False
        if old.needed_since is not None:
            self.timeline.missing(old.needed_since, now, old.containers)
        new = Session(old.host, old.containers)
        self.sessions[old.host].append(new)
        self.need(new, now)

    def call(self, host, session, now):
        timeline = self.timeline
        slot = int(now)
        timeline.calls[slot] += 1
        if self.sts.call(now) == OK:
            lifetime = self.args.duration
            expiration = now + lifetime
            if session.needed_since is not None:
                timeline.missing(session.needed_since, now, session.containers)
                session.needed_since = None
            elif session.expiration is not None and session.expiration < now:
                timeline.missing(session.expiration, now, session.containers)
            session.expiration = expiration
            session.failures = 0
            self.schedule(session, refresh_time(expiration, lifetime, self.draw))
        else:
            timeline.throttled[slot] += 1
            host.pacer.throttled()
            session.failures += 1
            holding = session.expiration is not None and session.expiration > now
            self.schedule(session, now + retry_delay(session.failures, THROTTLING, RETRY_CAP, holding))


def steady_start(fleet, lifetime):
    """Every session last refreshed at a random moment of its own refresh interval."""
    for _ in range(fleet.args.hosts):
        for session in fleet.add_host():
            interval = refresh_time(lifetime, lifetime, fleet.draw)   # issue to refresh
            issued = -fleet.rng.uniform(0, interval)
            session.expiration = issued + lifetime
            fleet.schedule(session, issued + interval)


def scenario_steady(fleet):
    steady_start(fleet, fleet.args.duration)


def scenario_deploy(fleet):
    """Every container is replaced once at a random moment of the hour."""
    steady_start(fleet, fleet.args.duration)
    if fleet.scope == "role":
        return   # a replacement joins its role's session on the host: no call
    for host_sessions in fleet.sessions:
        for session in list(host_sessions):
            fleet.schedule(Replacement(session), fleet.rng.uniform(0, 3600))


def scenario_restart(fleet):
    """Every host restarts at a random moment of the restart window and asks for everything."""
    window = fleet.args.restart_window
    for _ in range(fleet.args.hosts):
        when = fleet.rng.uniform(0, window)
        for session in fleet.add_host():
            fleet.need(session, when)


SCENARIOS = {"steady": scenario_steady, "deploy": scenario_deploy, "restart": scenario_restart}


def simulate(args, scenario, scope, seconds):
    fleet = Fleet(args, scope, seconds, seed=args.seed)
    SCENARIOS[scenario](fleet)
    began = time.perf_counter()
    fleet.run()
    return fleet, time.perf_counter() - began


def summarise(fleet, scenario, scope, elapsed):
    timeline = fleet.timeline
    calls = sum(timeline.calls)
    missing = timeline.missing_series()
    last_missing = max((second for second, level in enumerate(missing) if level > 0), default=-1)
    busy = [count for count in timeline.calls if count]
    return {
        "scenario": scenario, "scope": scope,
        "calls": calls, "throttled": sum(timeline.throttled),
        "peak_per_s": max(timeline.calls), "mean_per_s": calls / timeline.seconds,
        "median_busy_per_s": sorted(busy)[len(busy) // 2] if busy else 0,
        "max_without": max(missing), "without_at_end": missing[-1],
        "all_have_credentials_at": None if missing[-1] > 0 else last_missing + 1,
        "sim_seconds": elapsed,
        "calls_series": timeline.calls, "missing_series": missing,
    }


def table(rows, args):
    print(f"\n{args.hosts:,} hosts x {args.containers} containers ({args.roles} roles a host), "
          f"sessions of {args.duration} s, STS {args.sts_rate:g}/s burst {args.sts_burst:g}, "
          f"proxy stsRate {args.host_rate:g}/s burst {args.host_burst:g}, simulated {args.seconds} s")
    head = ("scenario", "scope", "calls", "throttled", "peak/s", "mean/s", "max without creds",
            "all have creds at s", "wall s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        done = "never" if r["all_have_credentials_at"] is None else f"{r['all_have_credentials_at']:,}"
        print(f"| {r['scenario']} | {r['scope']} | {r['calls']:,} | {r['throttled']:,} | {r['peak_per_s']:,} | "
              f"{r['mean_per_s']:,.1f} | {r['max_without']:,} | {done} | {r['sim_seconds']:.1f} |")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--containers", type=int, default=50, help="containers a host")
    parser.add_argument("--roles", type=int, default=5, help="distinct roles a host (sessionScope role)")
    parser.add_argument("--duration", type=int, default=3600, help="session duration, s")
    parser.add_argument("--sts-rate", type=float, default=500.0, help="account STS refill, calls/s (assumed)")
    parser.add_argument("--sts-burst", type=float, default=1000.0, help="account STS bucket size (assumed)")
    parser.add_argument("--host-rate", type=float, default=25.0, help="the proxy's stsRate")
    parser.add_argument("--host-burst", type=float, default=10.0, help="the proxy's stsBurst")
    parser.add_argument("--host-floor", type=float, default=PACER_DEFAULTS["floor"],
                        help="the pacer's lowest rate after Throttling (default: the proxy's)")
    parser.add_argument("--host-quiet", type=float, default=PACER_DEFAULTS["quiet"],
                        help="the pacer's quiet period before each step up, s (default: the proxy's)")
    parser.add_argument("--restart-window", type=float, default=300.0, help="s over which every host restarts")
    parser.add_argument("--seconds", type=int, default=3600, help="simulated time")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--scope", choices=["container", "role", "both"], default="both")
    parser.add_argument("--throttled-retry-cap", type=float,
                        help="override the proxy's THROTTLED_RETRY_CAP, s (to compare policies)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--json", help="write every row, with its per-second series, here")
    parser.add_argument("--plot", help="draw the per-second series into this PNG (matplotlib, from the "
                                       "bench-only tools venv, which is built on first use)")
    parser.add_argument("--replot", metavar="JSON", help=argparse.SUPPRESS)   # the tools venv's half of --plot
    return parser.parse_args(argv)


def plot(rows, path, args):
    """Draw here if matplotlib is importable, else in the bench-only tools venv from a JSON file."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import venvs
        python = venvs.ensure_venv(venvs.TOOLS_VENV, venvs.TOOLS_STEPS, lambda text: print(text, file=sys.stderr))
        data = Path(path).with_suffix(".json.tmp")
        data.write_text(json.dumps({"args": vars(args), "rows": rows}))
        try:
            subprocess.run([str(python), __file__, "--replot", str(data), "--plot", path], check=True, timeout=300)
        finally:
            data.unlink()
        return
    draw(rows, path, args)


def draw(rows, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in rows)]
    figure, axes = plt.subplots(2, len(scenarios), figsize=(4.2 * len(scenarios), 6.5), squeeze=False)
    colours = {"container": "tab:red", "role": "tab:green"}
    for column, scenario in enumerate(scenarios):
        for r in (r for r in rows if r["scenario"] == scenario):
            minutes = [second / 60 for second in range(len(r["calls_series"]))]
            axes[0][column].plot(minutes, r["calls_series"], color=colours[r["scope"]], linewidth=0.6,
                                 label=f"sessionScope {r['scope']}")
            axes[1][column].plot(minutes, r["missing_series"], color=colours[r["scope"]], linewidth=1.0)
        axes[0][column].axhline(args.sts_rate, color="k", linestyle=":", linewidth=0.8, label="STS refill")
        axes[0][column].set_title(scenario)
        axes[0][column].set_ylabel("AssumeRole calls per second")
        axes[1][column].set_ylabel("containers without credentials")
        axes[1][column].set_xlabel("minutes")
        for row in axes:
            row[column].grid(alpha=0.3)
    axes[0][0].legend(loc="upper right", fontsize=8)
    figure.suptitle(f"{args.hosts:,} hosts x {args.containers} containers, STS {args.sts_rate:g}/s "
                    f"(burst {args.sts_burst:g}), proxy stsRate {args.host_rate:g}/s", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        draw(saved["rows"], args.plot, argparse.Namespace(**saved["args"]))
        return 0
    if args.throttled_retry_cap is not None:
        ec2metaproxy.THROTTLED_RETRY_CAP = args.throttled_retry_cap
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    scopes = ["container", "role"] if args.scope == "both" else [args.scope]
    rows = []
    for scenario in scenarios:
        for scope in scopes:
            fleet, elapsed = simulate(args, scenario, scope, args.seconds)
            rows.append(summarise(fleet, scenario, scope, elapsed))
            print(f"[{scenario}/{scope}: {elapsed:.1f} s]", file=sys.stderr)
    table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}))
    if args.plot:
        plot(rows, args.plot, args)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
