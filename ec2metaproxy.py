#!/usr/bin/env python3
"""ec2metaproxy: per-container IAM credentials for Docker containers on EC2.

Containers on a Docker bridge ask the instance metadata service (IMDS,
169.254.169.254) for credentials; the firewall (setup-firewall.sh) sends that
traffic here. The proxy maps each request's source address to its container
(Docker Engine API over the unix socket, kept current from the event stream),
answers the credential paths with that container's own role, assumed with STS
ahead of time, answers IMDSv2 tokens itself and forwards every other metadata
path to the real IMDS. It never hands out the host's credentials. With
adminListen, a loopback (or unix socket) listener serves the operator health,
readiness, Prometheus metrics and the container index.

Run:   python3 ec2metaproxy.py -c config.json   (SIGHUP reloads the file, SIGTERM stops)
       ... --check | --explain ADDRESS_OR_CONTAINER | --validate-roles   (print, and exit)
Needs: Python 3.9+ standard library, and boto3 for STS.
Licence: MIT (see LICENSE).
"""

import argparse
import base64
import bisect
import collections
import contextlib
import dataclasses
import difflib
import fnmatch
import functools
import hashlib
import heapq
import hmac
import http.client
import http.server
import ipaddress
import json
import logging
import logging.handlers
import math
import os
import queue
import random
import re
import secrets
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
import urllib.parse
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

log = logging.getLogger("ec2metaproxy")

__version__ = "1.0.0"


def normalize_ip(address: str) -> str:
    """Return the canonical text of an IP address (IPv4-mapped IPv6 as IPv4)."""
    # Fast paths for what accept() gives: dotted IPv4, and IPv4 on a dual-stack socket.
    if ":" not in address:
        return address
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def iso8601(timestamp: float) -> str:
    """Format a Unix time the way IMDS and botocore expect: YYYY-MM-DDTHH:MM:SSZ."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter in [delay/2, delay]."""
    delay = min(cap, base * (2 ** min(failures, 16)))
    return delay * random.uniform(0.5, 1.0)


class Backoff:
    """Sleeps between retries of a background loop, growing to a cap; wakes early on stop."""

    def __init__(self, stop: threading.Event, base: float = 0.5, cap: float = 10.0):
        self._stop = stop
        self._base = base
        self._cap = cap
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        delay = backoff_delay(self.failures, self._base, self._cap)
        self.failures += 1
        return delay

    def wait(self) -> bool:
        """Sleep for the next delay; return False if the proxy is stopping."""
        return not self._stop.wait(self.next_delay())


class TokenBucket:
    """A rate with a burst. Not locked: its owner calls it under its own lock.

    Its owner may change `rate` at any time; the time since the last take refills at the
    rate in force when the next take comes.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._then = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._then) * self.rate)
        self._then = now

    def take(self) -> float:
        """Spend a token and return 0, or return the seconds until there is one (spending nothing)."""
        self._refill()
        if self._tokens > 1.0 - 1e-9:   # a token refilled exactly on time, up to rounding
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def drain(self) -> None:
        """Spend what is saved: the next token comes one interval from the last take at the earliest."""
        self._tokens = min(self._tokens, 0.0)

    def refund(self) -> None:
        """Give back a token reserve() took, for a call that was not made."""
        self._tokens = min(self.burst, self._tokens + 1.0)

    def reserve(self, max_wait: float) -> Optional[float]:
        """Spend a token now, in debt if need be, and return the seconds until it is due; None
        (spending nothing) when that is more than max_wait. Callers are served in turn."""
        self._refill()
        wait = max(0.0, (1.0 - 1e-9 - self._tokens) / self.rate)
        if wait > max_wait:
            return None
        self._tokens -= 1.0
        return wait


#####################################################################
# Metrics ###########################################################
# Owns the counters and histograms the parts below increment where things happen,
# and their Prometheus text; read only by the admin listener.

def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return str(int(value)) if value == int(value) else repr(float(value))


class Metric:
    """One metric family: a name, its help, its label names, and samples keyed by label values.

    An update is a dict operation under the family's own lock: no I/O, nothing else held.
    """

    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Tuple[str, ...] = (),
                 read: Optional[Callable[[], object]] = None):
        self.name = name
        self.help = help_text
        self.labels = labels
        self._read = read   # read from its owner at scrape time: a number, or {label values: number}
        self._lock = threading.Lock()
        self._values: Dict[Tuple[str, ...], float] = {}

    def label_text(self, values: Tuple[str, ...], extra: str = "") -> str:
        pairs = [f'{name}="{_escape_label(str(value))}"' for name, value in zip(self.labels, values)]
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""

    def samples(self) -> List[Tuple[Tuple[str, ...], float]]:
        if self._read is not None:
            value = self._read()
            return sorted(value.items()) if isinstance(value, dict) else [((), float(value))]
        with self._lock:
            return sorted(self._values.items())

    def render(self) -> List[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines = [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]
        for values, value in self.samples():
            lines.append(f"{self.name}{self.label_text(values)} {_number(value)}")
        return lines


class Counter(Metric):
    """A count that only goes up: `inc(*label_values)`."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Tuple[str, ...] = (),
                 read: Optional[Callable[[], object]] = None):
        super().__init__(name, help_text, labels, read)
        if not labels:
            self._values[()] = 0.0   # shown as 0 before the first event, not absent

    def inc(self, *values: str) -> None:
        with self._lock:
            self._values[values] = self._values.get(values, 0.0) + 1.0


class Gauge(Metric):
    """A value that goes up and down, read from its owner at scrape time."""

    kind = "gauge"


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram(Metric):
    """Observations (seconds) counted into fixed buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Tuple[str, ...] = (),
                 buckets: Tuple[float, ...] = LATENCY_BUCKETS):
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: Dict[Tuple[str, ...], List[float]] = {}   # label values -> [per bucket..., +Inf, sum]

    def observe(self, value: float, *values: str) -> None:
        slot = bisect.bisect_left(self.buckets, value)
        with self._lock:
            series = self._series.get(values)
            if series is None:
                series = self._series[values] = [0.0] * (len(self.buckets) + 2)
            series[slot] += 1.0
            series[-1] += value

    def samples(self):
        return []

    def render(self) -> List[str]:
        lines = super().render()
        with self._lock:
            series = sorted((values, list(counts)) for values, counts in self._series.items())
        for values, counts in series:
            total = 0.0
            for bound, count in zip(self.buckets + (math.inf,), counts):
                total += count
                le = 'le="%s"' % _number(bound)
                lines.append(f"{self.name}_bucket{self.label_text(values, le)} {_number(total)}")
            lines.append(f"{self.name}_sum{self.label_text(values)} {repr(counts[-1])}")
            lines.append(f"{self.name}_count{self.label_text(values)} {_number(total)}")
        return lines


class ProxyMetrics:
    """Every metric the proxy keeps, by name, and the last STS outcome per alias (for /readyz).

    Each part takes one in its constructor and increments it in one line where the
    event happens; a part built without one gets its own, read by nobody.
    """

    def __init__(self, arn_aliases: Optional[Mapping[str, str]] = None):
        self._arn_aliases = dict(arn_aliases or {})   # role ARN -> alias, for STS labels
        self.families: List[Metric] = []
        add = self.add
        self.requests = add(Counter("ec2metaproxy_requests_total",
                                    "Requests answered on the container-facing port, by route and status.",
                                    ("route", "status")))
        self.request_seconds = add(Histogram("ec2metaproxy_request_duration_seconds",
                                             "Time from a request's arrival to its answer, by route.", ("route",)))
        self.credentials_served = add(Counter("ec2metaproxy_credentials_served_total",
                                              "Credential answers handed to containers."))
        self.cache_hits = add(Counter("ec2metaproxy_credential_cache_hits_total",
                                      "Credential requests answered from the cache at once."))
        self.cache_misses = add(Counter("ec2metaproxy_credential_cache_misses_total",
                                        "Credential requests that had to wait for STS."))
        self.sts_calls = add(Counter("ec2metaproxy_sts_calls_total",
                                     "AssumeRole calls by alias and outcome (success, STS's error code, timeout).",
                                     ("alias", "outcome")))
        self.sts_seconds = add(Histogram("ec2metaproxy_sts_call_duration_seconds",
                                         "AssumeRole call latency by alias.", ("alias",)))
        self.docker_events = add(Counter("ec2metaproxy_docker_events_total",
                                         "Events read from Docker's event stream."))
        self.docker_listings = add(Counter("ec2metaproxy_docker_listings_total",
                                           "Container listings asked of Docker, by outcome (ok, error).",
                                           ("outcome",)))
        self.docker_reconnects = add(Counter("ec2metaproxy_docker_event_stream_reconnects_total",
                                             "Times following Docker's event stream failed or the stream ended."))
        self.tokens_issued = add(Counter("ec2metaproxy_imds_tokens_issued_total", "IMDSv2 tokens issued."))
        self.tokens_refused = add(Counter(
            "ec2metaproxy_imds_tokens_refused_total",
            "IMDSv2 token requests refused (request) and reads refused for a missing or invalid token (read).",
            ("reason",)))
        self.connections_refused = add(Counter("ec2metaproxy_connections_refused_total",
                                               "Connections refused by the per-source or total connection caps."))
        self._lock = threading.Lock()
        self._sts_last: Dict[str, Dict[str, object]] = {}

    def add(self, metric: Metric) -> Metric:
        self.families.append(metric)
        return metric

    def alias_of(self, arn: str) -> str:
        return self._arn_aliases.get(arn, "IAM_ROLE")

    def set_aliases(self, arn_aliases: Mapping[str, str]) -> None:
        """A reload's aliases, for the labels from now on (one assignment: readers see old or new)."""
        self._arn_aliases = dict(arn_aliases)

    def request_done(self, route: str, status: int, seconds: float) -> None:
        """One answered request: its count, its latency, and what it says about tokens."""
        self.requests.inc(route, str(status))
        self.request_seconds.observe(seconds, route)
        if route == "token":
            if status == 200:
                self.tokens_issued.inc()
            else:
                self.tokens_refused.inc("request")
        elif status == 401:
            self.tokens_refused.inc("read")

    def sts_call(self, arn: str, error: Optional["CredentialError"], seconds: float, when: float) -> None:
        """One AssumeRole call's outcome and latency; `when` is wall time, kept for /readyz."""
        alias = self.alias_of(arn)
        outcome = "success" if error is None else ("timeout" if error.timed_out else error.code)
        self.sts_calls.inc(alias, outcome)
        self.sts_seconds.observe(seconds, alias)
        with self._lock:
            last = self._sts_last.setdefault(alias, {})
            if error is None:
                last["success"] = when
            else:
                last["failure"], last["error"] = when, outcome

    def sts_last(self) -> Dict[str, Dict[str, object]]:
        """Alias -> the wall time of its last success, its last failure and that failure's code."""
        with self._lock:
            return {alias: dict(last) for alias, last in self._sts_last.items()}

    def render(self) -> str:
        """The Prometheus text exposition format, version 0.0.4."""
        return "\n".join(line for family in self.families for line in family.render()) + "\n"


#####################################################################
# Config ############################################################
# Owns the JSON file: parsing, validation with an error naming the key,
# and the immutable Config every other part reads.

ROLE_ARN = re.compile(
    r"^arn:(aws|aws-cn|aws-us-gov|aws-iso|aws-iso-[a-z]|aws-eusc):iam::(\d{12}):role/"
    r"((?:[\x21-\x2e\x30-\x7e]+/)*)([\w+=,.@-]{1,64})$"
)
SESSION_NAME_CHARS = re.compile(r"[^\w+=,.@-]")
PLACEHOLDER = re.compile(r"\{(name|id|image|label:[^{}]+|env:[^{}]+)\}")
ACCOUNT_ID = re.compile(r"^\d{12}$")
# Seconds: STS's own default session length, and one every role allows (MaxSessionDuration >= 1 hour).
STS_DEFAULT_DURATION = 3600


class ConfigError(Exception):
    """The configuration file is missing, malformed or inconsistent; the message names the key."""


@dataclasses.dataclass(frozen=True)
class AliasOptions:
    """One alias of aliasToARN: the role and the options for assuming it."""

    arn: str
    external_id: Optional[str] = None
    policy: Optional[str] = None
    policy_arns: Tuple[str, ...] = ()
    session_duration: Optional[int] = None
    session_tags: Tuple[Tuple[str, str], ...] = ()
    allow: Optional["AllowRule"] = None
    require_tokens: bool = False   # IMDSv2 only for the containers using this alias


@dataclasses.dataclass(frozen=True)
class AllowRule:
    """Which containers may use an alias: by image glob, by labels, by network name."""

    images: Tuple[str, ...] = ()
    labels: Tuple[Tuple[str, str], ...] = ()
    networks: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ForwardRule:
    """Which other metadata paths containers may read from the host's service (the `forward` key).

    Patterns are case-folded globs on the path after its version: `meta-data/instance-id`,
    `user-data`, `dynamic/...`. `allow` None means every path not denied; a deny pattern covers its subtree.
    """

    allow: Optional[Tuple[str, ...]] = None
    deny: Tuple[str, ...] = ()

    @property
    def everything(self) -> bool:
        return self.allow is None and not self.deny


@dataclasses.dataclass(frozen=True)
class Config:
    """The validated configuration; every field has its final type and default."""

    listen: Tuple[str, int]
    alias_to_arn: Mapping[str, AliasOptions]
    default_alias: Optional[str]
    default_policy: Optional[str] = None
    alias_label: str = "ec2metaproxy.RoleAlias"
    policy_label: str = "ec2metaproxy.Policy"
    docker_socket: str = "/var/run/docker.sock"
    metadata_url: str = "http://169.254.169.254"
    sts_region: Optional[str] = None
    sts_endpoint: Optional[str] = None
    session_duration: int = STS_DEFAULT_DURATION
    verbose: bool = False
    env_roles: bool = False
    allowed_roles: Tuple[str, ...] = ()
    default_account_id: Optional[str] = None
    account_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    session_name: str = "{name}"
    session_tags: Tuple[Tuple[str, str], ...] = ()
    source_identity: Optional[str] = None
    static_mappings: Tuple[Tuple[object, str], ...] = ()
    mock: bool = False
    require_tokens: bool = False
    sts_rate: float = 25.0
    sts_burst: float = 10.0
    session_scope: str = "container"
    forward: ForwardRule = ForwardRule()
    admin_listen: object = None   # (host, port) on loopback, or a unix socket path; None: no admin listener
    log_format: str = "text"


def _expect(key: str, value, kind, what: str):
    # bool is an int in Python; a config that says "verbose": 1 or "port": true is wrong.
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{key}: expected {what}, got {json.dumps(value)}")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {what}, got {json.dumps(value)[:60]}")
    return value


def parse_listen(key: str, value) -> Tuple[str, int]:
    """Parse ':18000', '127.0.0.1:18000' or '[::]:18000' into (host, port)."""
    _expect(key, value, str, 'an address like ":18000" or "127.0.0.1:18000"')
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: {value!r} is not HOST:PORT with a port from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} has an invalid IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{key}: {value!r}: write an IPv6 address in brackets, like [::]:18000")
    elif host and not re.match(r"^[A-Za-z0-9.-]+$", host):
        raise ConfigError(f"{key}: {value!r} has an invalid host")
    return host, int(port)


def parse_admin_listen(key: str, value):
    """A loopback HOST:PORT as (host, port), or "unix:///path" as the path; the operator's port only."""
    if isinstance(value, str) and value.startswith("unix://"):
        path = value[len("unix://"):]
        if not path.startswith("/") or path.endswith("/"):
            raise ConfigError(f"{key}: {value!r}: write a unix socket as unix:///absolute/path.sock")
        return path
    host, port = parse_listen(key, value)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"{key}: {value!r} is not a loopback address; use 127.0.0.1:PORT, [::1]:PORT "
                          "or unix:///PATH (the admin listener is never for containers)")
    return host, port


def parse_role_arn(key: str, value) -> str:
    _expect(key, value, str, "a role ARN")
    if not ROLE_ARN.match(value):
        raise ConfigError(f"{key}: {value!r} is not an IAM role ARN (arn:aws:iam::123456789012:role/NAME)")
    return value


def parse_policy(key: str, value) -> str:
    """A session policy: a JSON object, or a string holding one; returned as compact JSON."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: not valid JSON ({exc})") from None
    _expect(key, value, dict, "a policy document (a JSON object)")
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def parse_duration(key: str, value) -> int:
    _expect(key, value, int, "a whole number of seconds")
    if not 900 <= value <= 43200:
        raise ConfigError(f"{key}: {value} is outside 900..43200 seconds")
    return value


def parse_tags(key: str, value) -> Tuple[Tuple[str, str], ...]:
    _expect(key, value, dict, "an object of tag names to values")
    for name, tag_value in value.items():
        _expect(f"{key}.{name}", tag_value, str, "a string")
    return tuple(sorted(value.items()))


def parse_template(key: str, value) -> str:
    _expect(key, value, str, "a string")
    stripped = PLACEHOLDER.sub("", value)
    if "{" in stripped or "}" in stripped:
        raise ConfigError(f"{key}: {value!r} has an unknown placeholder; "
                          "use {name}, {id}, {image}, {label:KEY}, {env:KEY}")
    return value


def parse_allow(key: str, value) -> AllowRule:
    _expect(key, value, dict, 'an object like {"images": [...], "labels": {...}, "networks": [...]}')
    unknown = set(value) - {"images", "labels", "networks"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key (expected images, labels, networks)")
    images = _expect(f"{key}.images", value.get("images", []), list, "a list of image patterns")
    networks = _expect(f"{key}.networks", value.get("networks", []), list, "a list of network names")
    labels = _expect(f"{key}.labels", value.get("labels", {}), dict, "an object of label names to values")
    for index, item in enumerate(images + networks):
        _expect(f"{key}[{index}]", item, str, "a string")
    for name, label_value in labels.items():
        _expect(f"{key}.labels.{name}", label_value, str, "a string")
    return AllowRule(tuple(images), tuple(sorted(labels.items())), tuple(networks))


ALIAS_KEYS = {"arn", "externalId", "policy", "policyArns", "sessionDuration", "sessionTags", "allow",
              "requireTokens"}


def parse_alias(key: str, value) -> AliasOptions:
    """An aliasToARN value: the ARN as a string, or an object with the ARN and its options."""
    if isinstance(value, str):
        return AliasOptions(parse_role_arn(key, value))
    _expect(key, value, dict, 'a role ARN or an object like {"arn": ...}')
    for name in value:
        if name not in ALIAS_KEYS:
            raise ConfigError(f"{key}.{name}: unknown key{_suggest(name, ALIAS_KEYS)}")
    if "arn" not in value:
        raise ConfigError(f"{key}.arn: required key is missing")
    policy_arns = _expect(f"{key}.policyArns", value.get("policyArns", []), list, "a list of policy ARNs")
    for index, arn in enumerate(policy_arns):
        if not isinstance(arn, str) or not re.match(r"^arn:[\w-]+:iam::(\d{12}|aws):policy/", arn):
            raise ConfigError(f"{key}.policyArns[{index}]: {arn!r} is not an IAM policy ARN")
    external_id = value.get("externalId")
    if external_id is not None:
        _expect(f"{key}.externalId", external_id, str, "a string")
    return AliasOptions(
        arn=parse_role_arn(f"{key}.arn", value["arn"]),
        external_id=external_id,
        policy=parse_policy(f"{key}.policy", value["policy"]) if value.get("policy") is not None else None,
        policy_arns=tuple(policy_arns),
        session_duration=(parse_duration(f"{key}.sessionDuration", value["sessionDuration"])
                          if "sessionDuration" in value else None),
        session_tags=parse_tags(f"{key}.sessionTags", value.get("sessionTags", {})),
        allow=parse_allow(f"{key}.allow", value["allow"]) if "allow" in value else None,
        require_tokens=_expect(f"{key}.requireTokens", value.get("requireTokens", False), bool, "true or false"),
    )


# The `forward` presets, as deny patterns (each covers its subtree).
FORWARD_PRESETS = {
    "deny-user-data": ("user-data",),
    "deny-tags": ("meta-data/tags",),
    # The signed identity document lets its holder prove it is the instance (Vault's AWS auth, say).
    "deny-identity": ("dynamic/instance-identity",),
}
TREES = ("meta-data", "user-data", "dynamic")   # what a version holds; a bare pattern is under meta-data/


def forward_pattern(key: str, value) -> str:
    """An allow pattern, case-folded and relative to the version (`instance-id` -> `meta-data/instance-id`)."""
    _expect(key, value, str, 'a path pattern like "placement/*"')
    pattern = value.strip("/").casefold()
    if not pattern or any(segment in ("", ".", "..") for segment in pattern.split("/")) or "%" in pattern:
        raise ConfigError(f"{key}: {value!r} is not a metadata path pattern like \"placement/*\"")
    if pattern.split("/", 1)[0] not in TREES:
        pattern = "meta-data/" + pattern
    return pattern


def parse_forward(key: str, value) -> ForwardRule:
    """`forward`: "all", a preset, an {"allow": [...]} object, or a list combining presets and allow objects."""
    if value == "all":
        return ForwardRule()
    items = value if isinstance(value, list) else [value]
    allow: Optional[List[str]] = None
    deny: List[str] = []
    for index, item in enumerate(items):
        where = f"{key}[{index}]" if isinstance(value, list) else key
        if isinstance(item, str) and item in FORWARD_PRESETS:
            deny.extend(FORWARD_PRESETS[item])
        elif isinstance(item, dict) and set(item) == {"allow"}:
            patterns = _expect(f"{where}.allow", item["allow"], list, "a list of path patterns")
            allow = (allow or []) + [forward_pattern(f"{where}.allow[{n}]", p) for n, p in enumerate(patterns)]
        elif isinstance(item, dict):
            name = sorted(set(item) - {"allow"} or ["allow"])[0]
            raise ConfigError(f"{where}.{name}: " + ("required key is missing" if name == "allow" else
                                                     "unknown key (expected allow)"))
        elif item == "all":
            raise ConfigError(f'{where}: "all" is written alone, not in a list')
        else:
            raise ConfigError(f"{where}: {json.dumps(item)[:60]} is not one of \"all\", "
                              f"{', '.join(json.dumps(p) for p in FORWARD_PRESETS)} or {{\"allow\": [...]}}")
    if not items:
        raise ConfigError(f'{key}: an empty list; write "all" to forward every path')
    return ForwardRule(tuple(allow) if allow is not None else None, tuple(deny))


def parse_docker_host(key: str, value) -> str:
    _expect(key, value, str, 'a socket URL like "unix:///var/run/docker.sock"')
    if not value.startswith("unix://") or len(value) <= len("unix://"):
        raise ConfigError(f"{key}: {value!r}: only unix sockets are supported (unix:///var/run/docker.sock)")
    path = value[len("unix://"):]
    return path if path.startswith("/") else "/" + path


def parse_metadata_url(key: str, value) -> str:
    _expect(key, value, str, 'a URL like "http://169.254.169.254"')
    parts = urllib.parse.urlsplit(value)
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{key}: {value!r} has an invalid port") from None
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"{key}: {value!r} is not an http:// URL with a host and no path")
    return value.rstrip("/")


def parse_sts_endpoint(key: str, value) -> str:
    _expect(key, value, str, "a URL")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: {value!r} is not an http:// or https:// URL")
    return value


def parse_static_mappings(key: str, value) -> Tuple[Tuple[object, str], ...]:
    _expect(key, value, dict, 'an object of source IP or CIDR to alias, like {"10.0.0.0/24": "web"}')
    mappings = []
    for source, alias in value.items():
        try:
            network = ipaddress.ip_network(source, strict=False)
        except ValueError:
            raise ConfigError(f"{key}.{source}: not an IP address or CIDR") from None
        _expect(f"{key}.{source}", alias, str, "an alias name")
        mappings.append((network, alias))
    # Most specific network first, so a /32 wins over the /24 around it.
    mappings.sort(key=lambda item: -item[0].prefixlen)
    return tuple(mappings)


def parse_choice(key: str, value, choices) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value


def parse_positive(key: str, value, least: float, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= least:
        raise ConfigError(f"{key}: {value!r} is not a number of {unit} (at least {least:g})")
    return float(value)


def _string_or_null(key, value):
    return None if value is None else _expect(key, value, str, "a string or null")


def _string_list(key, value):
    _expect(key, value, list, "a list of strings")
    for index, item in enumerate(value):
        _expect(f"{key}[{index}]", item, str, "a string")
    return tuple(value)


def _account_map(key, value):
    _expect(key, value, dict, "an object of account names to 12-digit account ids")
    for name, account in value.items():
        if not isinstance(account, str) or not ACCOUNT_ID.match(account):
            raise ConfigError(f"{key}.{name}: {account!r} is not a 12-digit account id")
    return dict(value)


def _account_id(key, value):
    if value is None:
        return None
    if not isinstance(value, str) or not ACCOUNT_ID.match(value):
        raise ConfigError(f"{key}: {value!r} is not a 12-digit account id")
    return value


# JSON key -> (Config field, parser). Required keys are checked separately.
CONFIG_KEYS: Dict[str, Tuple[str, Callable]] = {
    "listen": ("listen", parse_listen),
    "aliasToARN": ("alias_to_arn", None),
    "defaultAlias": ("default_alias", _string_or_null),
    "defaultPolicy": ("default_policy", lambda k, v: None if v is None else parse_policy(k, v)),
    "aliasLabel": ("alias_label", lambda k, v: _expect(k, v, str, "a label name")),
    "policyLabel": ("policy_label", lambda k, v: _expect(k, v, str, "a label name")),
    "dockerHost": ("docker_socket", parse_docker_host),
    "metadataURL": ("metadata_url", parse_metadata_url),
    "stsRegion": ("sts_region", _string_or_null),
    "stsEndpoint": ("sts_endpoint", lambda k, v: None if v is None else parse_sts_endpoint(k, v)),
    "sessionDuration": ("session_duration", parse_duration),
    "verbose": ("verbose", lambda k, v: _expect(k, v, bool, "true or false")),
    "envRoles": ("env_roles", lambda k, v: _expect(k, v, bool, "true or false")),
    "allowedRoles": ("allowed_roles", _string_list),
    "defaultAccountId": ("default_account_id", _account_id),
    "accountMap": ("account_map", _account_map),
    "sessionName": ("session_name", parse_template),
    "sessionTags": ("session_tags", parse_tags),
    "sourceIdentity": ("source_identity", lambda k, v: None if v is None else parse_template(k, v)),
    "staticMappings": ("static_mappings", parse_static_mappings),
    "mock": ("mock", lambda k, v: _expect(k, v, bool, "true or false")),
    "requireTokens": ("require_tokens", lambda k, v: _expect(k, v, bool, "true or false")),
    "stsRate": ("sts_rate", lambda k, v: parse_positive(k, v, 0.1, "AssumeRole calls a second")),
    "stsBurst": ("sts_burst", lambda k, v: parse_positive(k, v, 1.0, "AssumeRole calls")),
    "sessionScope": ("session_scope", lambda k, v: parse_choice(k, v, SESSION_SCOPES)),
    "forward": ("forward", parse_forward),
    "adminListen": ("admin_listen", lambda k, v: None if v is None else parse_admin_listen(k, v)),
    "logFormat": ("log_format", lambda k, v: parse_choice(k, v, LOG_FORMATS)),
}
LOG_FORMATS = ("text", "json")
SESSION_SCOPES = ("container", "role")
SHARED_SESSION_NAME = "ec2metaproxy"   # sessionScope "role" without a sessionName of its own
CONTAINER_PLACEHOLDERS = re.compile(r"\{(name|id|env:[^{}]+)\}")   # differ from container to container
REQUIRED_KEYS = ("listen", "aliasToARN", "defaultAlias")


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_config(data) -> Config:
    """Validate a decoded JSON document into a Config."""
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a JSON object")
    for key in data:
        if key not in CONFIG_KEYS:
            raise ConfigError(f"{key}: unknown key{_suggest(key, CONFIG_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ConfigError(f"{key}: required key is missing")
    aliases = _expect("aliasToARN", data["aliasToARN"], dict, "an object of alias names to role ARNs")
    if not aliases:
        raise ConfigError("aliasToARN: must name at least one alias")
    values = {"alias_to_arn": {name: parse_alias(f"aliasToARN.{name}", arn) for name, arn in aliases.items()}}
    for key, raw in data.items():
        field, parser = CONFIG_KEYS[key]
        if parser is not None:
            values[field] = parser(key, raw)
    if values.get("session_scope") == "role":
        values.setdefault("session_name", SHARED_SESSION_NAME)
        templates = [("sessionName", values.get("session_name")), ("sourceIdentity", values.get("source_identity"))]
        templates += [(f"sessionTags.{tag}", value) for tag, value in values.get("session_tags", ())]
        templates += [(f"aliasToARN.{alias}.sessionTags.{tag}", value)
                      for alias, options in values["alias_to_arn"].items() for tag, value in options.session_tags]
        for key, template in templates:
            named = CONTAINER_PLACEHOLDERS.search(template or "")
            if named:
                raise ConfigError(f"{key}: {named.group(0)} names the container, but with sessionScope "
                                  f"'role' containers share one session")
    config = Config(**values)
    if config.default_alias is not None and config.default_alias not in config.alias_to_arn:
        raise ConfigError(f"defaultAlias: {config.default_alias!r} is not an alias in aliasToARN")
    for source, alias in data.get("staticMappings", {}).items():
        if alias not in config.alias_to_arn:
            raise ConfigError(f"staticMappings.{source}: {alias!r} is not an alias in aliasToARN")
    if isinstance(config.admin_listen, tuple) and config.admin_listen[1] == config.listen[1] != 0:
        raise ConfigError(f"adminListen: port {config.listen[1]} is the container-facing port (listen); "
                          "choose another")
    for index, pattern in enumerate(config.allowed_roles):
        if not pattern.startswith("arn:"):
            raise ConfigError(f"allowedRoles[{index}]: {pattern!r} is not an ARN pattern (arn:aws:iam::*:role/...)")
    return config


def load_config(path: str) -> Config:
    """Read and validate the JSON config file at path."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return parse_config(data)


#####################################################################
# Docker ############################################################
# Owns the Engine API client over AF_UNIX, the ContainerIndex (source IP ->
# container) and the DockerWatcher that keeps it current from listings and /events.

class DockerError(Exception):
    """The Docker daemon could not be reached or gave an unusable answer."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """An http.client connection to a unix socket."""

    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DockerClient:
    """The few Docker Engine API calls the proxy makes: list, inspect and the event stream."""

    def __init__(self, socket_path: str, timeout: float = 5.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def _get(self, path: str, timeout: float):
        conn = UnixHTTPConnection(self.socket_path, timeout)
        try:
            conn.request("GET", path, headers={"Host": "docker"})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise DockerError(f"{self.socket_path}: {getattr(exc, 'strerror', None) or exc}") from None
        if response.status != 200:
            body = response.read(500)
            conn.close()
            raise DockerError(f"GET {path}: HTTP {response.status} {body[:200]!r}")
        return conn, response

    def get_json(self, path: str):
        conn, response = self._get(path, self.timeout)
        try:
            return json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise DockerError(f"GET {path}: unreadable answer ({exc})") from None
        finally:
            conn.close()

    def list_containers(self) -> list:
        return self.get_json("/containers/json")

    def inspect(self, container_id: str) -> dict:
        return self.get_json(f"/containers/{urllib.parse.quote(container_id)}/json")

    def events(self):
        """Subscribe to the event stream; return an iterator of decoded events.

        The iterator ends when the daemon closes the stream and raises
        DockerError when it breaks.
        """
        filters = urllib.parse.quote(json.dumps({"type": ["container", "network"]}))
        # The answer's head comes within the usual time-out (a daemon going away mid-request
        # must not hold the subscription forever); after it, no read time-out: the stream is
        # idle for as long as nothing happens.
        conn, response = self._get(f"/events?filters={filters}", self.timeout)
        conn.sock.settimeout(None)
        return EventStream(conn, response)


class EventStream:
    """Docker's event stream: decoded events until the daemon closes it; close() ends it from
    another thread (the proxy stopping), since the stream is read with no time-out."""

    def __init__(self, conn, response):
        self._conn = conn
        self._events = self._read(conn, response)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._events)

    def close(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)   # a reader in another thread sees the end
        with contextlib.suppress(ValueError):   # ValueError: that reader is inside it right now
            self._events.close()

    @staticmethod
    def _read(conn, response):
        try:
            while True:
                try:
                    line = response.readline(1 << 20)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    raise DockerError(f"event stream broke: {exc}") from None
                if not line:
                    return
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        # A lost event may be a lost die: the index must be listed again.
                        log.warning("an undecodable Docker event (%d bytes); listing containers again", len(line))
                        yield {"Type": "undecodable"}
        finally:
            conn.close()


@dataclasses.dataclass(frozen=True)
class Container:
    """What the proxy knows of one running container (or of an address in staticMappings)."""

    id: str
    name: str
    image: str
    labels: Mapping[str, str]
    networks: Mapping[str, Tuple[str, ...]]
    env: Optional[Mapping[str, str]] = None
    static_alias: Optional[str] = None   # set on a staticMappings stand-in: the alias its address maps to

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def ips(self) -> Tuple[str, ...]:
        return tuple(ip for ips in self.networks.values() for ip in ips)

    @classmethod
    def from_summary(cls, item: dict, env: Optional[Mapping[str, str]] = None) -> "Container":
        """Build from an entry of GET /containers/json (or an inspect answer)."""
        settings = item.get("NetworkSettings") or {}
        mode = (item.get("HostConfig") or {}).get("NetworkMode", "")
        networks = {}
        if mode != "host":
            for net_name, net in (settings.get("Networks") or {}).items():
                ips = tuple(normalize_ip(net[key]) for key in ("IPAddress", "GlobalIPv6Address")
                            if net and net.get(key))
                if ips:
                    networks[net_name] = ips
        names = item.get("Names") or [item.get("Name") or item["Id"][:12]]
        config = item.get("Config") or {}
        return cls(
            id=item["Id"],
            name=names[0].lstrip("/"),
            image=item.get("Image") or config.get("Image") or "",
            labels=dict(item.get("Labels") or config.get("Labels") or {}),
            networks=networks,
            env=env,
        )

    @classmethod
    def from_create_event(cls, actor: Mapping) -> "Container":
        """What a create event tells: id, name, image and labels (Docker puts the labels among the
        attributes); no address yet, and no environment."""
        attributes = dict(actor.get("Attributes") or {})
        name, image = attributes.pop("name", ""), attributes.pop("image", "")
        return cls(id=actor["ID"], name=name or actor["ID"][:12], image=image, labels=attributes, networks={})

    @classmethod
    def static(cls, ip: str, alias: str) -> "Container":
        """The stand-in for an address staticMappings maps to an alias."""
        return cls(id=f"static-{ip}", name=f"static-{ip}", image="", labels={}, networks={}, static_alias=alias)


def parse_env(entries) -> Dict[str, str]:
    """Docker's ["KEY=value", ...] as a dict."""
    env = {}
    for entry in entries or ():
        key, _, value = entry.partition("=")
        env[key] = value
    return env


def list_containers(docker: DockerClient,
                    known_env: Optional[Callable[[str], Optional[Mapping[str, str]]]] = None) -> List[Container]:
    """Every running container; with known_env, each with its env (inspecting only those not known yet)."""
    containers = []
    for item in docker.list_containers():
        env = None
        if known_env is not None:
            env = known_env(item.get("Id"))
            if env is None:
                try:
                    env = parse_env((docker.inspect(item["Id"]).get("Config") or {}).get("Env"))
                except DockerError as exc:
                    log.warning("cannot inspect container %s: %s", item.get("Id", "")[:12], exc)
                    env = {}
        try:
            containers.append(Container.from_summary(item, env))
        except (KeyError, TypeError, AttributeError):
            log.warning("ignored a container Docker listed without an Id")
    return containers


class ContainerIndex:
    """Source IP -> container: what Docker last reported, plain maps behind one lock, with tombstones.

    A removal leaves a tombstone so that a listing begun before it cannot bring the
    container back. It makes no Docker call: DockerWatcher keeps it current.
    """

    STATIC_REMEMBERED = 4096   # staticMappings stand-ins kept; a wide range must not grow memory

    def __init__(self, static_mappings: Tuple[Tuple[object, str], ...] = (),
                 clock: Callable[[], float] = time.monotonic):
        self._static_mappings = static_mappings
        self._clock = clock
        self._lock = threading.Lock()
        # Reads take no lock: each map is replaced whole, or changed by single operations, under it.
        self._by_ip: Dict[str, Optional[Container]] = {}   # None: claimed by two containers
        self._by_id: Dict[str, Container] = {}
        self._tombstones: Dict[str, float] = {}   # container id or id/network -> time removed
        self._static: Dict[str, Container] = {}

    def lookup(self, ip: str) -> Optional[Container]:
        """The Docker container at ip, or None (unknown, or claimed by more than one)."""
        return self._by_ip.get(ip)

    def knows(self, ip: str) -> bool:
        """Whether Docker reported ip (a conflict counts: the address is Docker's)."""
        return ip in self._by_ip

    def containers(self, static: bool = False) -> List[Container]:
        """Every container Docker reported running (a copy); with static, the staticMappings stand-ins too."""
        return list(self._by_id.values()) + (list(self._static.values()) if static else [])

    def __len__(self) -> int:
        return len(self._by_id)

    def counts(self) -> Dict[str, int]:
        """Sizes of what is held, for logs and tests: nothing here may grow without bound."""
        return {"containers": len(self._by_id), "addresses": len(self._by_ip),
                "tombstones": len(self._tombstones), "static": len(self._static)}

    def static(self, ip: str) -> Optional[Container]:
        """The stand-in for ip if staticMappings covers it (most specific network first)."""
        if not self._static_mappings:
            return None
        container = self._static.get(ip)
        if container is not None:
            return container
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for network, alias in self._static_mappings:
            if address.version == network.version and address in network:
                container = Container.static(ip, alias)
                with self._lock:
                    if len(self._static) >= self.STATIC_REMEMBERED:
                        self._static.clear()
                    self._static[ip] = container
                return container
        return None

    def env_of(self, container_id: str) -> Optional[Mapping[str, str]]:
        """The env already read for a container, so that a listing inspects only new ones."""
        container = self._by_id.get(container_id)
        return container.env if container is not None else None

    def install(self, listing: List[Container], began: float) -> Tuple[List[Container], List[str]]:
        """Replace the index with a listing begun at `began`, keeping later removals.

        Returns the containers added and the ids removed.
        """
        with self._lock:
            by_id = {}
            for container in listing:
                if self._removed_after(container.id, began):
                    continue   # died while the listing was in flight
                dropped = [net for net in container.networks if self._removed_after(f"{container.id}/{net}", began)]
                if dropped:
                    container = dataclasses.replace(container, networks={
                        name: ips for name, ips in container.networks.items() if name not in dropped})
                previous = self._by_id.get(container.id)
                if previous == container:
                    container = previous   # unchanged: keep the object what was decided of it is keyed on
                by_id[container.id] = container
            by_ip: Dict[str, Optional[Container]] = {}
            conflicts = set()
            for container in by_id.values():
                for ip in container.ips:
                    if ip in by_ip and by_ip[ip] is not container:
                        conflicts.add(ip)
                    by_ip[ip] = container
            for ip in conflicts:
                by_ip[ip] = None   # two containers claim one address: answer neither rather than guess
            added = [c for cid, c in by_id.items() if cid not in self._by_id]
            removed = [cid for cid in self._by_id if cid not in by_id]
            self._by_id, self._by_ip = by_id, by_ip
            self._tombstones = {key: when for key, when in self._tombstones.items() if when > began}
        for ip in conflicts:
            log.warning("address %s is claimed by more than one container; it gets no credentials", ip)
        return added, removed

    def _removed_after(self, key: str, began: float) -> bool:
        when = self._tombstones.get(key)
        return when is not None and when > began

    def remove(self, container_id: str) -> bool:
        """Forget a container now (its die event): its addresses may be reused at once.

        Returns whether it was known.
        """
        with self._lock:
            self._tombstones[container_id] = self._clock()
            container = self._by_id.pop(container_id, None)
            if container is None:
                return False
            for ip in container.ips:
                if self._by_ip.get(ip) is container:
                    del self._by_ip[ip]
        return True

    def disconnect(self, container_id: str, network: str) -> None:
        """Drop a container's addresses on one network (its disconnect event)."""
        with self._lock:
            self._tombstones[f"{container_id}/{network}"] = self._clock()
            container = self._by_id.get(container_id)
            if container is None or network not in container.networks:
                return
            networks = {name: ips for name, ips in container.networks.items() if name != network}
            replacement = dataclasses.replace(container, networks=networks)
            self._by_id[container_id] = replacement
            kept = set(replacement.ips)
            for ip in container.ips:
                # Only what pointed to it: an address two containers claim stays blocked (None).
                if self._by_ip.get(ip) is container:
                    if ip in kept:
                        self._by_ip[ip] = replacement
                    else:
                        del self._by_ip[ip]

    def revive(self, key: str) -> None:
        """A start or connect event: the next listing may show the container (or network) again."""
        with self._lock:
            self._tombstones.pop(key, None)


class Why:
    """Why a listing is wanted; only an event skips the listing budget and the failure backoff."""

    EVENT = "a Docker event"
    UNKNOWN_CALLER = "an unknown caller"
    EVENTS_NOT_FOLLOWED = "events not followed"
    PERIODIC = "the periodic listing"


@dataclasses.dataclass(frozen=True)
class Found:
    """How the request path found a caller: the container (or stand-in, or None) and whether
    Docker's answer is current (events followed, or a listing completed while it waited)."""

    container: Optional[Container]
    fresh: bool


class DockerWatcher:
    """Keeps a ContainerIndex current: follows Docker's events and makes every listing call.

    One worker thread makes the listings, so bursts of events and of callers coalesce
    into one call; each listing not asked for by an event takes a token from one shared
    budget and, after a failure, waits out the backoff: while Docker is unhealthy its calls
    stay at a small fixed rate however many requests arrive.
    """

    RELIST_AFTER = 0.05   # an unknown caller's second look, for a container Docker lists late
    FULL_LISTING_EVERY = 60.0   # a listing even without events, should one have been lost
    LISTING_RATE = 4.0    # listings a second not asked for by an event, sustained...
    LISTING_BURST = 4.0   # ...and at once
    RETRY_BASE = 0.25     # after a failed listing, the next non-event one waits 0.25 s, doubling...
    RETRY_CAP = 1.0       # ...to 1 s: a recovered daemon is seen again within a second
    RESUBSCRIBE_CAP = 5.0   # the longest wait between attempts to follow the event stream

    def __init__(self, docker: DockerClient, index: ContainerIndex, with_env: bool = False,
                 on_change: Callable[[List[Container], List[str]], None] = lambda added, removed: None,
                 on_create: Callable[[Container], None] = lambda created: None,
                 clock: Callable[[], float] = time.monotonic, metrics: Optional[ProxyMetrics] = None):
        self._docker = docker
        self.metrics = metrics if metrics is not None else ProxyMetrics()
        self._index = index
        self._with_env = with_env
        self._on_change = on_change
        self._on_create = on_create
        self._stream: Optional[EventStream] = None   # the subscription, for stop() to end
        self._clock = clock
        self._budget = TokenBucket(self.LISTING_RATE, self.LISTING_BURST, clock)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requested = 0   # listings asked for
        self._started = 0     # listings begun
        self._finished = 0    # listings completed (or failed)
        self._event_waiting = False   # the pending listing was asked for by an event
        self._retry_at = 0.0  # after a failed listing, when the next non-event one may begin
        self._following_from: Optional[int] = None   # the first listing after subscribing to events
        self._stop = threading.Event()
        self.reachable: Optional[bool] = None
        self._heard_at: Optional[float] = None   # the last event read or listing completed

    # The request path

    def find(self, ip: str, current: bool, timeout: float) -> Found:
        """The one way to find a caller: Docker's answer first, then staticMappings.

        Without `current` (a request that only needs a name) it is a lookup. With it (a
        credential or token request): while events are not followed, a known address waits
        (bounded) for a listing begun now; an unknown address waits (bounded) for Docker to
        list it. A static mapping applies only to an address Docker does not know once that
        wait is over and Docker has answered: while it is slow or down, an address in a
        mapped range may belong to a container that just started.
        """
        index = self._index
        following = self.following()
        if index.knows(ip) and (following or not current):
            return Found(index.lookup(ip), following)
        if not current:
            return Found(index.static(ip), following)
        deadline = self._clock() + timeout
        with self._lock:
            if index.knows(ip):
                if self.reachable is False and self._retry_at > self._clock():
                    return Found(index.lookup(ip), False)   # Docker is failing: serve what is known, at once
                fresh = self._wait_listing_locked(self._ask_locked(Why.EVENTS_NOT_FOLLOWED), deadline)
                if index.knows(ip):
                    return Found(index.lookup(ip), fresh)
            else:
                fresh = self._wait_unknown_locked(ip, deadline)
        if index.knows(ip):
            return Found(index.lookup(ip), fresh)
        return Found(index.static(ip) if fresh else None, fresh)

    def _wait_listing_locked(self, ticket: int, deadline: float) -> bool:
        return self._changed.wait_for(lambda: self._finished >= ticket or self._stop.is_set(),
                                      max(0.0, deadline - self._clock())) and self._finished >= ticket

    def _wait_unknown_locked(self, ip: str, deadline: float) -> bool:
        """Closes the race of a container asking before Docker lists it.

        Its process can send traffic some milliseconds before its address shows in a listing
        (and its start event comes after that): ask for one listing now and one a little
        later, and wait for the address to show, from those or from its start event's listing.
        """
        wanted = self._ask_locked(Why.UNKNOWN_CALLER)
        if self.reachable is False:
            return False   # Docker is down: nobody new can show until it is back

        def known():
            # Also give up once a listing has failed: Docker is down and nothing will show.
            return (self._index.knows(ip) or self._stop.is_set()
                    or (self._finished >= wanted and self.reachable is False))
        if not self._changed.wait_for(known, min(self.RELIST_AFTER, max(0.0, deadline - self._clock()))):
            second = self._ask_locked(Why.UNKNOWN_CALLER)
            # A listing begun RELIST_AFTER later that does not show it is Docker's answer: not
            # a container (Docker lists a new one some milliseconds after it can send).
            self._changed.wait_for(lambda: known() or self._finished >= second,
                                   max(0.0, deadline - self._clock()))
        return self._finished >= wanted and self.reachable is not False

    def following(self) -> bool:
        """Whether the index follows Docker's events (subscribed, and listed since)."""
        ticket = self._following_from
        return ticket is not None and self._finished >= ticket

    def status(self) -> Dict[str, object]:
        """For /readyz: Docker reachable, its events followed, seconds since it was last heard."""
        heard = self._heard_at
        return {"reachable": self.reachable is True, "following_events": self.following(),
                "seconds_since_event_or_listing": None if heard is None else round(self._clock() - heard, 3)}

    # Asking for listings

    def ask(self, why: str) -> int:
        """Ask for a listing; returns its ticket (wait_synced waits for it)."""
        with self._lock:
            return self._ask_locked(why)

    def _ask_locked(self, why: str) -> int:
        # A listing that has not begun yet will see this change; otherwise ask for the next one.
        if self._requested <= self._started:
            self._requested = self._started + 1
        if why == Why.EVENT:
            self._event_waiting = True
        self._changed.notify_all()
        return self._requested

    def wait_synced(self, timeout: float) -> bool:
        """Wait until the listing asked for so far has completed."""
        with self._lock:
            wanted = self._requested
            return self._changed.wait_for(lambda: self._finished >= wanted, timeout)

    def _delay_locked(self) -> float:
        """Seconds before the pending listing may begin (0: now, having taken from the budget)."""
        if self._event_waiting:
            return 0.0
        delay = self._retry_at - self._clock()
        return delay if delay > 0 else self._budget.take()

    # Events

    def handle_event(self, event: dict) -> None:
        kind = event.get("Type") or ("container" if "status" in event else "")
        action = event.get("Action") or event.get("status") or ""
        actor = event.get("Actor") or {}
        if kind == "undecodable":
            self.ask(Why.EVENT)   # a lost event may be a lost die
        elif kind == "container":
            container_id = actor.get("ID") or event.get("id") or ""
            if action in ("die", "destroy"):
                self._index.remove(container_id)
                self._on_change([], [container_id])   # also for one created and never started
            elif action == "create" and container_id:
                self._on_create(Container.from_create_event(dict(actor, ID=container_id)))
            elif action in ("start", "restart", "unpause", "rename", "update"):
                if action == "start" and container_id:
                    # Docker puts the labels among a start event's attributes too: a container
                    # whose create event went by unseen (`docker start` of a stopped one, a restart
                    # policy) has its fetch begun beside the listing, not after it.
                    self._on_create(Container.from_create_event(dict(actor, ID=container_id)))
                self._index.revive(container_id)
                self.ask(Why.EVENT)
        elif kind == "network":
            attributes = actor.get("Attributes") or {}
            container_id, network = attributes.get("container", ""), attributes.get("name", "")
            if action == "disconnect" and container_id:
                self._index.disconnect(container_id, network)
            elif action == "connect" and container_id:
                self._index.revive(f"{container_id}/{network}")
                self.ask(Why.EVENT)

    # Listings

    def sync_once(self) -> bool:
        """Make one listing now (start-up); return whether Docker answered."""
        with self._lock:
            self._requested = max(self._requested, self._started + 1)
        return self._list_once()

    def _list_once(self) -> bool:
        began = self._clock()
        with self._lock:
            self._started += 1
            ticket = self._started
        try:
            listing = list_containers(self._docker, self._index.env_of if self._with_env else None)
        except DockerError as exc:
            ok = False
            self._set_reachable(False, str(exc))
        else:
            ok = True
            self._heard_at = self._clock()
            added, removed = self._index.install(listing, began)
            if added or removed:
                self._on_change(added, removed)
            self._set_reachable(True)
        with self._lock:
            self._finished = max(self._finished, ticket)
            self._changed.notify_all()
        self.metrics.docker_listings.inc("ok" if ok else "error")
        return ok

    def _set_reachable(self, reachable: bool, error: str = "") -> None:
        if reachable and self.reachable is not True:
            log.info("Docker is reachable at %s: %d running containers", self._docker.socket_path, len(self._index))
        elif not reachable and self.reachable is not False:
            log.warning("Docker is not reachable at %s yet (%s); serving known containers and retrying",
                        self._docker.socket_path, error)
        self.reachable = reachable

    def _listing_loop(self) -> None:
        backoff = Backoff(self._stop, base=self.RETRY_BASE, cap=self.RETRY_CAP)
        while not self._stop.is_set():
            with self._lock:
                if not self._changed.wait_for(lambda: self._requested > self._started or self._stop.is_set(),
                                              self.FULL_LISTING_EVERY):
                    self._ask_locked(Why.PERIODIC)
                delay = self._delay_locked()
                while delay > 0 and not self._stop.is_set():
                    self._changed.wait(delay)   # an event's ask wakes it early
                    delay = self._delay_locked()
                self._event_waiting = False
                if self._stop.is_set():
                    return
            ok = self._list_once()
            with self._lock:
                if ok:
                    backoff.reset()
                    self._retry_at = 0.0
                else:
                    self._retry_at = self._clock() + backoff.next_delay()

    def _event_loop(self) -> None:
        backoff = Backoff(self._stop, cap=self.RESUBSCRIBE_CAP)
        while not self._stop.is_set():
            try:
                stream = self._stream = self._docker.events()
                if self._stop.is_set():
                    stream.close()   # stop() came while subscribing
                # Subscribed: a listing now misses nothing that happened while we were away.
                self._following_from = self.ask(Why.EVENT)
                backoff.reset()
                for event in stream:
                    self._heard_at = self._clock()
                    self.metrics.docker_events.inc()
                    self.handle_event(event)
                    if self._stop.is_set():
                        return
                error = "the event stream ended"
            except DockerError as exc:
                error = str(exc)
            self._following_from = None   # events may be missed from now on
            if self._stop.is_set():
                return
            self.metrics.docker_reconnects.inc()
            self._set_reachable(False, error)
            if not backoff.wait():
                return

    def start(self) -> None:
        for target, name in ((self._listing_loop, "docker-listings"), (self._event_loop, "docker-events")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._changed.notify_all()
        if self._stream is not None:
            self._stream.close()   # the event thread is blocked reading it


#####################################################################
# Roles #############################################################
# Owns the decision of which role (with external id, session policy, tags
# and session name) a container may use; the answer is remembered per container.

VALID_VERSION = re.compile(r"^(latest|[0-9]{4}-[0-9]{2}-[0-9]{2}|1\.0)$")
DECIMAL = re.compile(r"^[0-9]{1,12}$")
TAG_VALUE_CHARS = re.compile(r"[^\w\s.:/=+@-]")


@dataclasses.dataclass(frozen=True)
class RoleSpec:
    """Everything one AssumeRole call needs; also the credential cache key."""

    arn: str
    session_name: str
    policy: Optional[str] = None
    external_id: Optional[str] = None
    policy_arns: Tuple[str, ...] = ()
    tags: Tuple[Tuple[str, str], ...] = ()
    source_identity: Optional[str] = None
    duration: int = STS_DEFAULT_DURATION
    # How the container must ask (its alias's requireTokens), not what STS is asked: not in the cache key.
    require_tokens: bool = dataclasses.field(default=False, compare=False)

    @property
    def role_name(self) -> str:
        return self.arn.rsplit("/", 1)[1]

    @property
    def account_id(self) -> str:
        return self.arn.split(":")[4]


def session_safe(text: str, fallback: str) -> str:
    """Sanitise to STS's RoleSessionName rules: [\\w+=,.@-], 2..64 characters."""
    text = SESSION_NAME_CHARS.sub("-", text)[:64]
    if len(text) < 2:
        text = (text + "-" + fallback)[:64] if text else fallback[:64]
    return text


def render_template(template: str, container: Container) -> str:
    def value(match):
        key = match.group(1)
        if key == "name":
            return container.name
        if key == "id":
            return container.short_id
        if key == "image":
            return container.image
        source, _, name = key.partition(":")
        if source == "label":
            return container.labels.get(name, "")
        return (container.env or {}).get(name, "")
    return PLACEHOLDER.sub(value, template)


def image_matches(pattern: str, container: Container) -> bool:
    """Glob an image pattern on repository:tag (a pattern without a tag matches any tag), or a digest."""
    image = container.image
    last = image.rsplit("/", 1)[-1]
    reference = image if (":" in last or "@" in last) else image + ":latest"
    if fnmatch.fnmatchcase(reference, pattern) or fnmatch.fnmatchcase(image, pattern):
        return True
    pattern_last = pattern.rsplit("/", 1)[-1]
    if ":" not in pattern_last and "@" not in pattern_last:
        return fnmatch.fnmatchcase(reference.split("@", 1)[0].rsplit(":", 1)[0], pattern)
    return False


def allow_failure(rule: AllowRule, container: Container) -> Optional[str]:
    """Return which part of an allow rule a container fails, or None when it passes."""
    if rule.images and not any(image_matches(pattern, container) for pattern in rule.images):
        return f"image {container.image!r} matches none of {list(rule.images)}"
    for name, value in rule.labels:
        if container.labels.get(name) != value:
            return f"label {name}={value!r} is not set"
    if rule.networks and not set(rule.networks) & set(container.networks):
        return f"not on any of the networks {list(rule.networks)}"
    return None


class RoleChoice(NamedTuple):
    """The alias chosen for a container, with the external id and session policy it asks for."""

    alias: str
    options: AliasOptions
    external_id: Optional[str]
    policy: Optional[str]          # the container's own session policy text, if it gives one
    policy_source: str             # where that text came from, for messages
    rule: str = "-"                # what chose the alias: a label, IAM_ROLE, staticMappings, defaultAlias


class Decision(NamedTuple):
    """What a container gets: its RoleSpec and the alias and rule behind it, or None and why."""

    spec: Optional[RoleSpec]
    alias: str = "-"
    rule: str = "-"
    reason: str = ""
    arn: str = "-"   # the alias's role, even when it is refused


NO_ALIAS = "no role label and no defaultAlias"   # configured to get nothing: not worth a warning


class RoleResolver:
    """Decides which role a container may use, from its labels, its env (if allowed) or the default."""

    def __init__(self, config: Config):
        self._config = config
        self.config = config
        self._memo: Dict[str, Tuple[Container, Decision]] = {}
        self._memo_lock = threading.Lock()   # requests, listings and events all decide and forget
        self._arn_aliases = {options.arn: name for name, options in config.alias_to_arn.items()}
        self._partition = next(iter(config.alias_to_arn.values())).arn.split(":")[1]
        self._allowed = config.allowed_roles or tuple(self._arn_aliases)
        # Whether any alias has requireTokens: when none has, a tokenless read needs no role decision.
        self.tokens_required = any(options.require_tokens for options in config.alias_to_arn.values())

    def role_for(self, container: Container) -> Optional[RoleSpec]:
        """The container's role, or None when it gets no credentials (logged once per container)."""
        return self.decision_for(container).spec

    def decision_for(self, container: Container) -> Decision:
        """The container's Decision, made once per container (a refusal logged then).

        A staticMappings address is decided each time (a dict lookup): no event ever
        removes one, so remembering them would grow without bound.
        """
        if container.static_alias is not None:
            return self.explain(container)
        memo = self._memo.get(container.id)
        if memo is not None and memo[0] is container:
            return memo[1]
        decision = self.explain(container)
        with self._memo_lock:
            memo = self._memo.get(container.id)
            if memo is not None and memo[0] is container:
                return memo[1]   # another thread decided first: one decision, one warning
            self._memo[container.id] = (container, decision)
        if decision.spec is None and decision.reason != NO_ALIAS:
            log.warning("container %s (%s) gets no credentials: %s", container.name, container.short_id,
                        decision.reason)
        return decision

    def provisional(self, container: Container) -> Optional[RoleSpec]:
        """The role from what is known before a listing shows the container (its create or start
        event); not remembered."""
        return self.explain(container).spec

    def forget(self, container_ids) -> None:
        with self._memo_lock:
            for container_id in container_ids:
                self._memo.pop(container_id, None)

    def decided(self, container_id: str) -> bool:
        """Whether the container has been decided (a listing showed it), and not forgotten since."""
        return container_id in self._memo

    def __len__(self) -> int:
        """How many decisions are remembered (one per live container)."""
        return len(self._memo)

    def explain(self, container: Container) -> Decision:
        """Decide afresh, remembering and logging nothing (--explain, a reload, a create event)."""
        choice, reason = self._choose(container)
        if choice is None:
            return Decision(None, reason=reason or NO_ALIAS)
        if choice.options.allow is not None:
            failure = allow_failure(choice.options.allow, container)
            if failure:
                return Decision(None, choice.alias, choice.rule,
                                f"alias {choice.alias!r} is not allowed for it by its allow rule ({failure})",
                                choice.options.arn)
        policy, reason = self._policy(container, choice)
        if reason:
            return Decision(None, choice.alias, choice.rule, reason, choice.options.arn)
        return Decision(self._spec(container, choice, policy), choice.alias, choice.rule, "", choice.options.arn)

    def _choose(self, container: Container) -> Tuple[Optional[RoleChoice], str]:
        """The alias: a static mapping's, the label's, IAM_ROLE's (if envRoles) or the default."""
        config = self._config
        env = container.env or {}
        alias = container.static_alias or container.labels.get(config.alias_label)
        policy = container.labels.get(config.policy_label)
        policy_source = f"label {config.policy_label}"
        if alias is not None:
            if alias not in config.alias_to_arn:
                return None, f"label {config.alias_label} names alias {alias!r}, which is not in aliasToARN"
            rule = "staticMappings" if container.static_alias else f"label {config.alias_label}"
            return RoleChoice(alias, config.alias_to_arn[alias], None, policy, policy_source, rule), ""
        if config.env_roles and env.get("IAM_ROLE"):
            options, reason = self._env_role(env["IAM_ROLE"])
            if options is None:
                return None, reason
            if policy is None and env.get("IAM_POLICY"):
                policy, policy_source = env["IAM_POLICY"], "env IAM_POLICY"
            return RoleChoice(self._arn_aliases.get(options.arn, "IAM_ROLE"), options,
                              env.get("IAM_EXTERNAL_ID") or None, policy, policy_source, "env IAM_ROLE"), ""
        if config.default_alias is not None:
            return RoleChoice(config.default_alias, config.alias_to_arn[config.default_alias],
                              None, policy, policy_source, "defaultAlias"), ""
        return None, ""   # no label and no defaultAlias: no credentials, as configured

    def _policy(self, container: Container, choice: RoleChoice) -> Tuple[Optional[str], str]:
        """The session policy: the alias's own, else the container's (if valid), else defaultPolicy."""
        policy = choice.options.policy
        if choice.policy is not None:
            if policy is not None:
                log.info("container %s: alias %r has its own policy; ignoring the %s",
                         container.name, choice.alias, choice.policy_source)
            else:
                try:
                    policy = parse_policy(choice.policy_source, choice.policy)
                except ConfigError as exc:
                    return None, f"its session policy is invalid: {exc}"
        return (policy if policy is not None else self._config.default_policy), ""

    def _spec(self, container: Container, choice: RoleChoice, policy: Optional[str]) -> RoleSpec:
        config, options = self._config, choice.options
        tags = dict(config.session_tags)
        tags.update(options.session_tags)
        rendered_tags = tuple(sorted(
            (key, TAG_VALUE_CHARS.sub("-", render_template(value, container))[:256])
            for key, value in tags.items()))
        source_identity = None
        if config.source_identity:
            source_identity = session_safe(render_template(config.source_identity, container), container.short_id)
        return RoleSpec(
            arn=options.arn,
            session_name=session_safe(render_template(config.session_name, container),
                                      "ec2metaproxy-" + container.short_id),
            policy=policy,
            external_id=choice.external_id or options.external_id,
            policy_arns=options.policy_arns,
            tags=rendered_tags,
            source_identity=source_identity,
            duration=options.session_duration or config.session_duration,
            require_tokens=options.require_tokens,
        )

    def _env_role(self, value: str) -> Tuple[Optional[AliasOptions], str]:
        """Turn an IAM_ROLE value (alias, name, name@account, ARN) into alias options, if allowed."""
        config = self._config
        if value in config.alias_to_arn:
            return config.alias_to_arn[value], ""
        if value.startswith("arn:"):
            arn = value
        else:
            name, _, account = value.partition("@")
            if account:
                account_id = config.account_map.get(account, account)
                if not ACCOUNT_ID.match(account_id):
                    return None, f"IAM_ROLE {value!r} names account {account!r}, which is not in accountMap"
            elif config.default_account_id:
                account_id = config.default_account_id
            else:
                return None, f"IAM_ROLE {value!r} has no account and defaultAccountId is not set"
            arn = f"arn:{self._partition}:iam::{account_id}:role/{name}"
        if not ROLE_ARN.match(arn):
            return None, f"IAM_ROLE {value!r} is not a valid role"
        if not any(fnmatch.fnmatchcase(arn, pattern) for pattern in self._allowed):
            return None, f"IAM_ROLE role {arn} is not in allowedRoles"
        alias = self._arn_aliases.get(arn)
        return (config.alias_to_arn[alias] if alias else AliasOptions(arn)), ""


#####################################################################
# Credentials #######################################################
# Owns STS AssumeRole (bounded in time and attempts), the cache (fetched when a container
# starts, refreshed well before expiry), the audit of what is handed out and refused, and the
# reaction to containers starting and stopping (and to a reload).

class CredentialError(Exception):
    """STS could not provide credentials; code is STS's error code or the proxy's reason."""

    timed_out = False   # the call timed out (connecting or reading): "timeout" in the metrics

    def __init__(self, code: str, message: str, retryable: bool = True):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclasses.dataclass(frozen=True)
class Credentials:
    """One set of temporary credentials and its two IMDS answers, rendered once."""

    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    token: str = dataclasses.field(repr=False)
    expiration: float
    last_updated: float
    body: bytes = dataclasses.field(repr=False, default=b"")
    extended_body: bytes = dataclasses.field(repr=False, default=b"")

    @classmethod
    def issue(cls, access_key_id, secret_access_key, token, expiration, last_updated, account_id):
        answer = {
            "Code": "Success",
            "LastUpdated": iso8601(last_updated),
            "Type": "AWS-HMAC",
            "AccessKeyId": access_key_id,
            "SecretAccessKey": secret_access_key,
            "Token": token,
            "Expiration": iso8601(expiration),
        }
        body = json.dumps(answer, indent=2).encode()
        answer["AccountId"] = account_id
        extended = json.dumps(answer, indent=2).encode()
        return cls(access_key_id, secret_access_key, token, expiration, last_updated, body, extended)


NON_RETRYABLE = {"AccessDenied", "ValidationError", "MalformedPolicyDocument", "PackedPolicyTooLarge",
                 "RegionDisabledException", "InvalidIdentityToken", "InvalidParameter"}


class StsClient:
    """AssumeRole through boto3, each call bounded in time and made once (the cache retries)."""

    CLIENT_BUILD_WAIT = 30.0   # seconds a worker waits for another to build the client (~0.5 s)

    def __init__(self, region: Optional[str] = None, endpoint: Optional[str] = None,
                 metadata_url: Optional[str] = None, connect_timeout: float = 1.0,
                 read_timeout: float = 3.0, clock: Callable[[], float] = time.time):
        import boto3
        import botocore.config
        import botocore.exceptions
        import botocore.session
        self._boto3 = boto3
        self._errors = botocore.exceptions
        self._region = region
        self._endpoint = endpoint
        self._metadata_url = metadata_url
        self._client_config = botocore.config.Config(
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=16)
        self._new_session = botocore.session.Session
        self._clock = clock
        self._client = None
        # Building a client costs ~0.5 s and ~9 MB and may ask the metadata service for the
        # proxy's own credentials: one STS worker builds it while the others wait on an event,
        # the lock held only to choose the builder (no request thread ever waits here).
        self._client_lock = threading.Lock()
        self._client_built: Optional[threading.Event] = None   # set when the build under way ends
        self._short_roles: Dict[str, bool] = {}

    def _session(self):
        session = self._new_session()
        # The proxy's own credentials come from the metadata service it forwards to.
        if self._metadata_url:
            session.set_config_variable("ec2_metadata_service_endpoint", self._metadata_url + "/")
        session.set_config_variable("metadata_service_timeout", 1)
        session.set_config_variable("metadata_service_num_attempts", 2)
        # The region's own endpoint, never the global one in us-east-1 (older botocore's default).
        session.set_config_variable("sts_regional_endpoints", "regional")
        return session

    def _make_client(self):
        boto_session = self._boto3.session.Session(botocore_session=self._session())
        return boto_session.client("sts", region_name=self._region, endpoint_url=self._endpoint,
                                   config=self._client_config)

    def use_region(self, region: str) -> None:
        """The region whose STS endpoint to call (the instance's), if the config names none."""
        if self._region is None and self._endpoint is None:
            self._region = region

    def endpoint(self) -> str:
        """The STS endpoint the client calls (building the client if it is not built yet)."""
        return self.client().meta.endpoint_url

    def credential_source(self) -> Optional[str]:
        """Where the proxy's own AWS credentials come from (botocore's name for it), or None."""
        try:
            credentials = self._session().get_credentials()
        except self._errors.BotoCoreError as exc:
            log.debug("looking for the proxy's own AWS credentials failed: %s", exc)
            return None
        return credentials.method if credentials is not None else None

    def assume_role(self, spec: RoleSpec, shorten: bool = True) -> Credentials:
        """One AssumeRole call for spec; raise CredentialError with STS's code on failure.

        With shorten, a duration over the role's maximum is retried at one hour (--validate-roles
        passes False, to report it).
        """
        duration = STS_DEFAULT_DURATION if self._short_roles.get(spec.arn) else spec.duration
        try:
            return self._assume(spec, duration)
        except CredentialError as exc:
            if (shorten and exc.code == "ValidationError" and "MaxSessionDuration" in exc.message
                    and duration != STS_DEFAULT_DURATION):
                if not self._short_roles.get(spec.arn):
                    log.warning("role %s does not allow %d-second sessions; using %d",
                                spec.arn, duration, STS_DEFAULT_DURATION)
                self._short_roles[spec.arn] = True
                return self._assume(spec, STS_DEFAULT_DURATION)
            raise

    def client(self):
        """The STS client, built once (and again after the proxy had no credentials)."""
        client = self._client
        if client is not None:
            return client
        with self._client_lock:
            built, builder = self._client_built, self._client_built is None
            if builder:
                built = self._client_built = threading.Event()
        if not builder:
            built.wait(self.CLIENT_BUILD_WAIT)
            if self._client is None:
                raise CredentialError("STSClientError", "the STS client could not be built")
            return self._client
        try:
            self._client = self._make_client()
        except self._errors.BotoCoreError as exc:
            raise CredentialError("STSClientError", str(exc)) from None
        finally:
            with self._client_lock:
                self._client_built = None
            built.set()
        return self._client

    def _assume(self, spec: RoleSpec, duration: int) -> Credentials:
        client = self.client()
        params = {"RoleArn": spec.arn, "RoleSessionName": spec.session_name, "DurationSeconds": duration}
        if spec.policy:
            params["Policy"] = spec.policy
        if spec.external_id:
            params["ExternalId"] = spec.external_id
        if spec.policy_arns:
            params["PolicyArns"] = [{"arn": arn} for arn in spec.policy_arns]
        if spec.tags:
            params["Tags"] = [{"Key": key, "Value": value} for key, value in spec.tags]
        if spec.source_identity:
            params["SourceIdentity"] = spec.source_identity
        try:
            answer = client.assume_role(**params)["Credentials"]
        except self._errors.NoCredentialsError:
            # The host may get credentials later (an instance profile attached, a file written):
            # build a fresh client, with a fresh credential chain, on the next try.
            self._client = None
            raise CredentialError("NoHostCredentials", "the proxy has no AWS credentials of its own") from None
        except self._errors.ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "Unknown")
            raise CredentialError(code, error.get("Message", ""), code not in NON_RETRYABLE) from None
        except self._errors.ParamValidationError as exc:
            raise CredentialError("InvalidParameter", str(exc).replace("\n", " "), retryable=False) from None
        except self._errors.BotoCoreError as exc:
            # Connection and time-out errors; their text names the endpoint, never a body.
            error = CredentialError("STSUnavailable", str(exc))
            error.timed_out = isinstance(exc, (self._errors.ConnectTimeoutError, self._errors.ReadTimeoutError))
            raise error from None
        except Exception as exc:
            # Anything else (an unparsable answer, say) may carry the response body, and with
            # it a secret key: keep only the type.
            raise CredentialError("STSError", type(exc).__name__) from None
        try:
            now = self._clock()
            expiration = answer["Expiration"]
            expiration = expiration.timestamp() if hasattr(expiration, "timestamp") else float(expiration)
            return Credentials.issue(answer["AccessKeyId"], answer["SecretAccessKey"], answer["SessionToken"],
                                     expiration, now, spec.account_id)
        except (KeyError, TypeError, ValueError) as exc:
            raise CredentialError("STSError", f"incomplete answer ({type(exc).__name__})") from None


def refresh_margin(lifetime: float) -> float:
    """How long before expiry to refresh: 40 minutes for an hour-long session, half for longer ones.

    botocore treats credentials with less than ~15 minutes left as expiring, so a
    client must always be handed credentials with plenty of time left.
    """
    return max(lifetime / 2, min(2400.0, lifetime - 300.0))


REFRESH_JITTER = 0.1   # up to 10% more margin, drawn per refresh: sessions started together spread out


def refresh_time(expiration: float, lifetime: float, draw: Callable[[], float] = random.random) -> float:
    """When to refresh credentials expiring at expiration: refresh_margin early, plus jitter.

    The jitter only ever refreshes earlier, so the 30-minute floor holds; the draw is a
    seam for the fleet simulation in bench/.
    """
    return expiration - refresh_margin(lifetime) * (1.0 + REFRESH_JITTER * draw())


THROTTLE_CODES = frozenset({"Throttling", "ThrottlingException", "RequestLimitExceeded"})
RETRY_BASE = 0.5            # the first retry after a failed AssumeRole, seconds (before jitter)
# STS's account budget is spent and every host of the fleet is retrying too: back off further,
# furthest for a refresh, whose credentials still have ten minutes or more above the floor.
THROTTLED_RETRY_CAP = 60.0
THROTTLED_REFRESH_CAP = 240.0


def retry_delay(failures: int, error: CredentialError, cap: float, holding: bool = False) -> float:
    """Seconds until the next AssumeRole for a key after `failures` failed calls in a row.

    Quick after a blip; slower when STS says the account's budget is spent (retrying
    fast then only spends it again; a refresh, holding valid credentials, can wait
    longest) or when the error will not go away by itself.
    """
    if error.code in THROTTLE_CODES:
        cap = max(cap, THROTTLED_REFRESH_CAP if holding else THROTTLED_RETRY_CAP)
    elif not error.retryable:
        cap *= 8
    return backoff_delay(failures - 1, RETRY_BASE, cap)


class StsPacer:
    """One budget for every AssumeRole call of the process: a token bucket that halves its rate
    when STS says Throttling and climbs back one step per quiet period (AIMD).

    It never blocks and holds no lock of its own: its owner calls it under its own lock,
    and the fleet simulation in bench/ drives it with a simulated clock.
    """

    SAME_EPISODE = 1.0   # throttles this close to the last cut answer calls already in flight

    # The floor and the quiet period are set for a fleet: 10,000 hosts sharing an account's
    # few hundred calls a second get about 0.05 each, and a host that climbs back within
    # seconds only spends STS's budget on Throttling answers (docs/fleet.md, bench/fleet_sim.py).
    def __init__(self, rate: float = 25.0, burst: float = 10.0, floor: float = 0.05, quiet: float = 60.0,
                 step: Optional[float] = None, clock: Callable[[], float] = time.monotonic):
        self.ceiling = rate
        self.floor = min(floor, rate)
        self.quiet = quiet
        self.step = step if step is not None else max(rate / 10.0, 0.1)
        self.throttles = 0
        self._clock = clock
        self._bucket = TokenBucket(rate, max(1.0, burst), clock)
        self._cut_at = -math.inf   # when the rate was last cut
        self._calm_from = -math.inf   # quiet periods count from here (the last cut or step)

    @property
    def rate(self) -> float:
        """The calls a second allowed now."""
        return self._bucket.rate

    def take(self) -> float:
        """Take one call's token and return 0.0, or return the seconds until one is there."""
        self._climb(self._clock())
        return self._bucket.take()

    def throttled(self) -> None:
        """STS answered Throttling: halve the rate (not below the floor) and empty the bucket."""
        now = self._clock()
        self.throttles += 1
        if now - self._cut_at < self.SAME_EPISODE:
            return
        self._climb(now)
        self._bucket.rate = max(self.floor, self.rate / 2.0)
        self._bucket.drain()
        self._cut_at = self._calm_from = now

    def _climb(self, now: float) -> None:
        # Additive increase: one step for every quiet period since the last cut or step.
        if self.rate >= self.ceiling:
            return
        steps = int((now - self._calm_from) // self.quiet)
        if steps > 0:
            self._bucket.rate = min(self.ceiling, self.rate + steps * self.step)
            self._calm_from += steps * self.quiet


@dataclasses.dataclass(eq=False)
class _Entry:
    """The cache's state for one (container, role) key."""

    label: str
    creds: Optional[Credentials] = None
    refresh_at: float = 0.0
    done: Optional[threading.Event] = None   # set when the fetch under way ends
    released: bool = False   # paced and in the work queue
    running: bool = False
    error: Optional[CredentialError] = None
    failures: int = 0
    retry_at: float = 0.0
    orphan: bool = False   # made by a request that raced its container's removal or a reload: for it only
    provisional: bool = False   # fetched on a create event: not refreshed or retried until the start adopts it
    on_demand: bool = False   # a staticMappings address's: refreshed only when asked, dropped when it expires


class CredentialCache:
    """Per-container credentials: prefetched, refreshed ahead of expiry, single-flight per key.

    Requests never wait on a lock held across I/O: STS calls run on worker
    threads; a request waits (bounded) only on the event of the fetch it needs.
    Every fetch goes through one StsPacer: those a request waits for first,
    then background work (prefetch, refresh, retry) as it comes due.
    """

    MIN_VALID = 60.0   # never hand out credentials with less than this left
    GONE_REMEMBERED = 60.0   # seconds a removed container's id is remembered, against racing requests
    # Work queue priorities: stopping first, then a fetch a request may wait for, then background work.
    STOP, REQUESTED, BACKGROUND = -1, 0, 1

    SHARED = ""   # the owner part of a key shared by every container with the same RoleSpec

    def __init__(self, sts, workers: int = 6, pacer: Optional[StsPacer] = None,
                 clock: Callable[[], float] = time.time, retry_cap: float = 8.0, shared: bool = False,
                 metrics: Optional[ProxyMetrics] = None):
        self._sts = sts
        self.metrics = metrics if metrics is not None else ProxyMetrics()
        self._clock = clock
        self.pacer = pacer if pacer is not None else StsPacer()
        self._retry_cap = retry_cap
        self._shared = shared   # sessionScope "role": one session per RoleSpec, not per container
        self._entries: Dict[Tuple[str, RoleSpec], _Entry] = {}
        self._by_container: Dict[str, set] = {}   # container id -> the keys it uses
        self._guessed: Dict[str, set] = {}   # container id -> keys its create or start event's guess took
        self._users: Dict[Tuple[str, RoleSpec], set] = {}   # key -> the containers using it
        self._gone: Dict[str, float] = {}   # container id -> when it was dropped (oldest first)
        self._lock = threading.Lock()
        self._waited_for: "collections.deque[Tuple[str, RoleSpec]]" = collections.deque()   # not yet paced
        self._due: List[Tuple[float, int, Tuple[str, RoleSpec]]] = []   # a heap of background work
        self._due_changed = threading.Condition(self._lock)
        self._work: "queue.PriorityQueue" = queue.PriorityQueue()
        self._seq = 0
        self._stop = threading.Event()
        self._workers = workers
        self.reachable: Optional[bool] = None

    def __len__(self) -> int:
        return len(self._entries)

    def counts(self) -> Dict[str, int]:
        """Sizes of what is held, for logs and tests: nothing here may outlive its container for long."""
        with self._lock:
            return {"entries": len(self._entries), "containers": len(self._by_container),
                    "fetched": sum(1 for entry in self._entries.values() if entry.creds is not None),
                    "scheduled": len(self._due), "gone": len(self._gone), "guessed": len(self._guessed)}

    def peek(self, container_id: str, spec: RoleSpec) -> Tuple[Optional[Credentials], Optional[str]]:
        """The credentials held for a container's role and the last fetch's error code, if any;
        changes nothing (for /containers)."""
        entry = self._entries.get(self._key(container_id, spec))
        if entry is None:
            return None, None
        return entry.creds, entry.error.code if entry.error is not None else None

    def failing(self) -> Dict[str, str]:
        """Role ARN -> STS's error code, for each held key whose last fetch failed (for /readyz)."""
        with self._lock:
            return {key[1].arn: entry.error.code for key, entry in self._entries.items()
                    if entry.error is not None and not (entry.provisional or entry.on_demand)}

    def expiring_within(self, seconds: float) -> int:
        """How many held credentials expire within `seconds` (for /readyz: the floor must hold)."""
        horizon = self._clock() + seconds
        with self._lock:
            return sum(1 for entry in self._entries.values()   # a create event's guess is not kept up
                       if entry.creds is not None and not (entry.provisional or entry.on_demand)
                       and entry.creds.expiration < horizon)

    def start(self) -> None:
        threading.Thread(target=self._release_loop, name="sts-pacer", daemon=True).start()
        for number in range(self._workers):
            threading.Thread(target=self._work_loop, name=f"sts-{number}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._due_changed.notify_all()
        for _ in range(self._workers):
            self._work.put((self.STOP, 0, None))

    # The request path

    def cached(self, container_id: str, spec: RoleSpec, on_demand: bool = False,
               current: Callable[[], bool] = lambda: True) -> Optional[Credentials]:
        """Credentials to hand out now, without waiting; schedules a refresh when one is due."""
        key = self._key(container_id, spec, on_demand)
        entry = self._entries.get(key)
        if entry is None or entry.creds is None:
            return None
        if key[0] == self.SHARED and container_id not in self._users.get(key, ()):
            with self._lock:   # another container's session: count this one among its users...
                if current():   # ...unless a reload has moved it off this role meanwhile
                    self._use_locked(key, entry, container_id)
        now = self._clock()
        if entry.creds.expiration - now <= self.MIN_VALID:
            return None
        if now >= entry.refresh_at and entry.done is None and now >= entry.retry_at:
            with self._lock:
                if entry.done is None:
                    self._wait_for_locked(key, entry)
        return entry.creds

    def get(self, container_id: str, label: str, spec: RoleSpec, timeout: float,
            on_demand: bool = False, current: Callable[[], bool] = lambda: True) -> Credentials:
        """Credentials for the container, waiting at most timeout for STS; else CredentialError.

        On demand (an address of a staticMappings range, which no event ever removes): the
        entry is not kept up in the background, and goes when its credentials expire unused.
        current: whether the config the spec was decided under is still in force, asked under
        the cache lock when the request makes a new entry. A reload swaps the config before it
        drops the old roles' entries, so an entry made after a reload overtook its request
        answers that request and is not kept.
        """
        creds = self.cached(container_id, spec, on_demand, current)
        if creds is not None:
            self.metrics.cache_hits.inc()
            self.metrics.credentials_served.inc()
            return creds
        self.metrics.cache_misses.inc()
        key = self._key(container_id, spec, on_demand)
        with self._lock:
            fresh = key not in self._entries
            overtaken = not current()
            if fresh or not overtaken:
                entry = self._entry_locked(key, container_id, label)
            else:
                entry = self._entries[key]   # a fetch under way: waited for, not kept up by this request
            if fresh:
                entry.on_demand = on_demand
                entry.orphan = entry.orphan or overtaken
            if entry.done is None:
                if entry.error is not None and self._clock() < entry.retry_at:
                    raise entry.error   # backing off: answer at once rather than hammer STS
                self._wait_for_locked(key, entry)
            elif entry.released and not entry.running:
                self._enqueue(key, self.REQUESTED)   # paced as background work but still queued: go first
            done = entry.done
        done.wait(timeout)
        creds = entry.creds
        if creds is not None and creds.expiration - self._clock() > self.MIN_VALID:
            self.metrics.credentials_served.inc()
            return creds
        raise entry.error or CredentialError("STSTimeout", "STS did not answer in time")

    # Background work

    def prefetch(self, container_id: str, label: str, spec: RoleSpec, provisional: bool = False,
                 revive: bool = True) -> None:
        """Fetch credentials for a new container in the background (paced).

        Provisional (a create event's guess): fetched once, never refreshed or retried,
        until a prefetch of the same spec at the container's start adopts it.
        """
        with self._lock:
            if provisional and self._by_container.get(container_id):
                return   # its start was handled first (a listing beat the create event)
            if container_id in self._gone and not revive:
                return   # gone meanwhile (a reload deciding it again raced its removal)
            self._gone.pop(container_id, None)   # a restart keeps the id
            key = self._key(container_id, spec)
            fresh = key not in self._entries
            entry = self._entry_locked(key, container_id, label)
            if provisional:
                self._guessed.setdefault(container_id, set()).add(key)
            if fresh:
                entry.provisional = provisional
            elif entry.provisional and not provisional:
                entry.provisional = False   # started as its create event said: refreshed from now on
                if entry.creds is not None and entry.done is None:
                    self._schedule_locked(key, entry.refresh_at)
            if entry.creds is None and entry.done is None:
                self._schedule_locked(key, max(self._clock(), entry.retry_at))

    def forget(self, container_id: str, spec: RoleSpec, on_demand: bool = False) -> None:
        """The container no longer uses spec (a reload decided otherwise); the session goes with its last user."""
        with self._lock:
            self._unlink_locked(self._key(container_id, spec, on_demand), container_id)

    def discard_provisional(self, container_id: str, keep: Optional[RoleSpec]) -> None:
        """A container just decided uses keep's credentials: what its create or start event's guess
        took for another spec goes, a fetch or a place among a shared session's users (which would
        keep that session up). What a request made for it stays."""
        kept = None if keep is None else self._key(container_id, keep)
        with self._lock:
            guessed = self._guessed.pop(container_id, set())
            for key in list(self._by_container.get(container_id, ())):
                entry = self._entries.get(key)
                if key != kept and (key in guessed or (entry is not None and entry.provisional)):
                    self._unlink_locked(key, container_id)

    def drop_container(self, container_id: str) -> None:
        """Forget every credential of a container that is gone (a shared one with its last user)."""
        with self._lock:
            for key in list(self._by_container.get(container_id, ())):
                self._unlink_locked(key, container_id)
            self._guessed.pop(container_id, None)
            now = self._clock()
            self._gone.pop(container_id, None)
            self._gone[container_id] = now
            while self._gone and next(iter(self._gone.values())) < now - self.GONE_REMEMBERED:
                del self._gone[next(iter(self._gone))]

    def _unlink_locked(self, key, container_id: str) -> None:
        """The container no longer uses key; the entry goes with its last user."""
        keys = self._by_container.get(container_id, set())
        keys.discard(key)
        if not keys:
            self._by_container.pop(container_id, None)
        users = self._users.get(key, set())
        users.discard(container_id)
        if not users:
            self._users.pop(key, None)
            self._entries.pop(key, None)

    def _key(self, container_id: str, spec: RoleSpec, on_demand: bool = False) -> Tuple[str, RoleSpec]:
        # A staticMappings address never shares: it would keep a shared session alive forever.
        return (self.SHARED if self._shared and not on_demand else container_id, spec)

    def _entry_locked(self, key, container_id: str, label: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            if self._shared:   # its first container may go long before the session does
                label = f"the shared {key[1].role_name} session {key[1].session_name}"
            entry = self._entries[key] = _Entry(label, orphan=container_id in self._gone)
        self._use_locked(key, entry, container_id)
        return entry

    def _use_locked(self, key, entry: _Entry, container_id: str) -> None:
        if container_id in self._gone or self._entries.get(key) is not entry:
            return   # a request that raced its container's removal (or the entry's) adds no user
        entry.orphan = False   # a live container uses it (a shared session, say): keep it
        self._users.setdefault(key, set()).add(container_id)
        self._by_container.setdefault(container_id, set()).add(key)

    def _forget_locked(self, key) -> None:
        for user in list(self._users.get(key, ())):
            self._unlink_locked(key, user)
        self._entries.pop(key, None)

    def _schedule_locked(self, key, when: float) -> None:
        self._seq += 1
        heapq.heappush(self._due, (when, self._seq, key))
        self._due_changed.notify()

    def _wait_for_locked(self, key, entry: _Entry) -> None:
        """A request waits for this fetch: it is paced ahead of all background work."""
        entry.done = threading.Event()
        self._waited_for.append(key)
        self._due_changed.notify()

    def _enqueue(self, key, priority: int) -> None:
        self._seq += 1
        self._work.put((priority, self._seq, key))

    def _release_loop(self) -> None:
        """Release fetches into the work queue as the pacer allows: waited-for ones first."""
        while not self._stop.is_set():
            with self._lock:
                key, wake_in = self._next_locked()
                if key is None:
                    self._due_changed.wait(wake_in)
                    continue
                pause = self.pacer.take()
                if pause > 0:
                    # Choose again after the pause: a request may come to wait meanwhile.
                    self._due_changed.wait(min(pause, 1.0))
                    continue
                entry = self._entries[key]
                if self._waited_for and self._waited_for[0] == key:
                    self._waited_for.popleft()
                    priority = self.REQUESTED
                else:
                    heapq.heappop(self._due)
                    entry.done = threading.Event()
                    priority = self.BACKGROUND
                entry.released = True
                self._enqueue(key, priority)

    def _next_locked(self) -> Tuple[Optional[Tuple[str, RoleSpec]], float]:
        """The next fetch to release (None, and how long to sleep, when nothing is due)."""
        while self._waited_for:
            key = self._waited_for[0]
            entry = self._entries.get(key)
            if entry is not None and entry.done is not None and not entry.released:
                return key, 0.0
            self._waited_for.popleft()   # dropped meanwhile
        now = self._clock()
        while self._due:
            when, _, key = self._due[0]
            if when > now:
                return None, min(when - now, 1.0)
            entry = self._entries.get(key)
            if entry is not None and entry.on_demand:
                heapq.heappop(self._due)
                if entry.done is None and (entry.creds is None or entry.creds.expiration - self.MIN_VALID <= now):
                    self._forget_locked(key)   # unused since its last fetch: nothing keeps it
                continue
            if (entry is not None and entry.done is None
                    and (entry.creds is None or now >= entry.refresh_at)):
                return key, 0.0
            heapq.heappop(self._due)   # no longer needed
        return None, 1.0

    def _work_loop(self) -> None:
        while True:
            _, _, key = self._work.get()
            if key is None:
                return
            with self._lock:
                entry = self._entries.get(key)
                if entry is None or entry.done is None or entry.running:
                    continue   # dropped, already done, or a duplicate of a promoted fetch
                entry.running = True
            self._fetch(key, entry)

    def _fetch(self, key, entry: _Entry) -> None:
        spec = key[1]
        creds = error = None
        started = time.perf_counter()
        try:
            creds = self._sts.assume_role(spec)
        except CredentialError as exc:
            error = exc
        except Exception as exc:   # a bug must not kill the worker; its text might hold a secret
            log.error("AssumeRole %s for %s failed unexpectedly: %s", spec.arn, entry.label, type(exc).__name__)
            error = CredentialError("InternalError", type(exc).__name__)
        now = self._clock()
        self.metrics.sts_call(spec.arn, error, time.perf_counter() - started, now)
        with self._lock:
            done, entry.done, entry.running, entry.released = entry.done, None, False, False
            if error is not None and error.code in THROTTLE_CODES:
                self.pacer.throttled()
            if entry.orphan:
                self._forget_locked(key)   # answer the request that made it; keep nothing
            # Kept up (refreshed, retried) while it is held and its container has started.
            current = self._entries.get(key) is entry and not entry.provisional
            if creds is not None:
                lifetime = max(creds.expiration - now, 0.0)
                entry.creds, entry.error, entry.failures = creds, None, 0
                entry.refresh_at = refresh_time(creds.expiration, lifetime)
                if current:   # an on-demand entry comes due only to be dropped if unused by then
                    self._schedule_locked(key, creds.expiration - self.MIN_VALID if entry.on_demand
                                          else entry.refresh_at)
            else:
                entry.error = error
                entry.failures += 1
                holding = entry.creds is not None and entry.creds.expiration > now
                entry.retry_at = now + retry_delay(entry.failures, error, self._retry_cap, holding)
                if current:   # on demand: dropped then, unless a request tries again first
                    self._schedule_locked(key, entry.retry_at)
        done.set()
        if creds is not None:
            log.debug("assumed %s for %s as session %s, expiring %s",
                      spec.arn, entry.label, spec.session_name, iso8601(creds.expiration))
            if self.reachable is not True:
                self.reachable = True
                log.info("STS is answering: credentials assumed for %s", entry.label)
        else:
            first = entry.failures == 1 or not error.retryable
            log.log(logging.WARNING if first else logging.DEBUG,
                    "AssumeRole %s for %s failed (attempt %d): %s; retrying in %.1fs",
                    spec.arn, entry.label, entry.failures, error, entry.retry_at - now)
            if error.code in ("STSUnavailable", "NoHostCredentials", "STSClientError"):
                self.reachable = False


# Field names of an audit line, in its text order; JSON log lines carry them as keys (see README).
AUDIT_FIELDS = ("outcome", "container_id", "container_name", "image", "alias", "role_arn", "session_name",
                "access_key_id", "expiration", "source", "imds", "reason")
# Values quoted: a key=value run would look like a secret to redact().
AUDIT_TEXT = ('audit %s container="%s" name="%s" image="%s" alias="%s" role="%s" session="%s" '
              'access_key_id="%s" expiration="%s" source="%s" imds="%s" reason="%s"')


class Audit:
    """Writes one line each time a container is handed an AccessKeyId it had not been handed, and
    one per refusal; never a secret key, a session token or an IMDSv2 token."""

    def __init__(self, remembered: int = 65536, events: Optional["EventLog"] = None):
        self.events = events if events is not None else EventLog()
        self._handed: Dict[str, str] = {}   # container id -> the AccessKeyId it was last handed
        self._lock = threading.Lock()
        # staticMappings stand-ins are never removed: a wide range must not grow memory. At
        # worst, forgetting costs a repeated line.
        self._remembered = remembered

    def handed(self, source: str, imds: str, container: Container, decision: Decision,
               creds: Credentials) -> None:
        """Credentials went to a container; a line only when their AccessKeyId is new to it."""
        if self._handed.get(container.id) == creds.access_key_id:
            return   # the request path's whole cost: one dict read
        with self._lock:
            if self._handed.get(container.id) == creds.access_key_id:
                return
            if len(self._handed) >= self._remembered:
                self._handed.clear()
            self._handed[container.id] = creds.access_key_id
        self._write("granted", source, imds, container, decision, creds.access_key_id,
                    iso8601(creds.expiration), "-")

    def refused(self, source: str, imds: str, container: Optional[Container], decision: Decision,
                reason: str) -> None:
        self._write("refused", source, imds, container, decision, "-", "-", reason)

    def forget(self, container_ids) -> None:
        with self._lock:
            for container_id in container_ids:
                self._handed.pop(container_id, None)

    def __len__(self) -> int:
        return len(self._handed)

    def _write(self, outcome, source, imds, container, decision, access_key_id, expiration, reason) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        spec = decision.spec
        args = (outcome, container.id if container else "-", container.name if container else "-",
                (container.image or "-") if container else "-", decision.alias,
                decision.arn, spec.session_name if spec else "-",
                access_key_id, expiration, source, imds, reason)
        self.events.write(AUDIT_TEXT, args, AUDIT_FIELDS, "audit")


class ContainerLifecycle:
    """Reacts to changes in the container index: decides a new container's role and prefetches its
    credentials; forgets a gone container's credentials and role.

    A container's credentials are first fetched on its create event, from its labels, so
    that they are ready when it starts and asks at once (or on its start event, beside the
    listing, when no create event was seen). That fetch is provisional: the decision made
    once the listing shows the container, with its networks and environment, adopts it or
    discards it.
    """

    def __init__(self, roles: RoleResolver, credentials: CredentialCache, audit: Optional[Audit] = None):
        self.roles = roles   # replaced whole by a reload (reconfigure)
        self._credentials = credentials
        self._audit = audit
        # Held while containers are decided and their fetches queued, so that a container
        # starting during a reload is decided under the old roles and then seen by the reload,
        # or under the new ones: never left with the old role's credentials.
        self._deciding = threading.Lock()

    def created(self, container: Container) -> None:
        """A create event (or a start event with none before it): fetch, once, for the role its labels name.

        Not once a listing has shown the container: it is decided then, with its networks and
        environment, and a guess made after that would never be adopted nor discarded.
        """
        with self._deciding:
            if self.roles.decided(container.id):
                return
            spec = self.roles.provisional(container)
            if spec is not None:
                self._credentials.prefetch(container.id, container.name, spec, provisional=True)

    def changed(self, added: List[Container], removed: List[str]) -> None:
        """Called by DockerWatcher, from its own threads, holding no lock."""
        for container_id in removed:
            self._credentials.drop_container(container_id)
        if self._audit is not None:
            self._audit.forget(removed)
        with self._deciding:
            roles = self.roles
            roles.forget(removed)
            for container in added:
                spec = roles.role_for(container)
                if spec is not None:
                    self._credentials.prefetch(container.id, container.name, spec)
                self._credentials.discard_provisional(container.id, keep=spec)

    def reconfigure(self, roles: RoleResolver, containers: List[Container]
                    ) -> List[Tuple[Container, Optional[RoleSpec], Optional[RoleSpec]]]:
        """A reload: decide every known container under the new roles; one whose role changed gets
        the new role's credentials prefetched and the old ones dropped. Returns (container, old, new)."""
        with self._deciding:
            old, self.roles = self.roles, roles
            changes = []
            for container in containers:
                before, after = old.provisional(container), roles.role_for(container)
                if before != after:
                    changes.append((container, before, after))
            for container, before, after in changes:
                # A staticMappings address is fetched when it asks (on demand), never ahead.
                if after is not None and container.static_alias is None:
                    self._credentials.prefetch(container.id, container.name, after, revive=False)
                if before is not None:
                    self._credentials.forget(container.id, before, container.static_alias is not None)
        return changes


#####################################################################
# IMDS protocol #####################################################
# Owns IMDSv2 tokens, path normalisation, and the routing of one request:
# answered here (tokens, credentials), forwarded to the host IMDS, or refused.

TOKEN_TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "x-aws-ec2-metadata-token"
MAX_TOKEN_TTL = 21600   # seconds: the longest token IMDS itself issues
STATUS_TEXT = {
    200: "OK", 301: "Moved Permanently", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large",
    414: "URI Too Long", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """A request refused with an HTTP status: raised anywhere, answered in one place (the handler).

    close: the client did something it should not have, and loses its connection.
    """

    def __init__(self, status: int, reason: str = "", close: bool = False,
                 headers: Tuple[Tuple[str, str], ...] = ()):
        super().__init__(reason or STATUS_TEXT[status])
        self.status = status
        self.close = close
        self.headers = headers


class TokenIssuer:
    """Stateless IMDSv2 tokens: an expiry and a nonce, signed with a per-process key, bound to a caller.

    Nothing is stored per token, so a flood of token requests cannot grow memory.
    """

    # A token is base64url without padding of: expiry (big-endian seconds) | nonce | MAC.
    EXPIRY_BYTES = 8
    NONCE_BYTES = 8
    PAYLOAD_BYTES = EXPIRY_BYTES + NONCE_BYTES   # 16
    MAC_BYTES = 24                               # a truncated HMAC-SHA256
    TOKEN_BYTES = PAYLOAD_BYTES + MAC_BYTES      # 40
    TOKEN_LENGTH = 54                            # characters: 40 bytes in base64, padding dropped

    def __init__(self, key: Optional[bytes] = None, clock: Callable[[], float] = time.time):
        self._key = key or secrets.token_bytes(32)
        self._clock = clock

    def _mac(self, payload: bytes, binding: str) -> bytes:
        return hmac.new(self._key, payload + binding.encode(), hashlib.sha256).digest()[:self.MAC_BYTES]

    def issue(self, binding: str, ttl: int) -> str:
        payload = struct.pack(">Q", int(self._clock()) + ttl) + secrets.token_bytes(self.NONCE_BYTES)
        return base64.urlsafe_b64encode(payload + self._mac(payload, binding)).decode().rstrip("=")

    def valid(self, token: str, binding: str) -> bool:
        if len(token) != self.TOKEN_LENGTH:
            return False
        try:
            raw = base64.urlsafe_b64decode(token + "==")
        except ValueError:
            return False
        payload, mac = raw[:self.PAYLOAD_BYTES], raw[self.PAYLOAD_BYTES:]
        if len(raw) != self.TOKEN_BYTES or not hmac.compare_digest(mac, self._mac(payload, binding)):
            return False
        return self._clock() < struct.unpack(">Q", payload[:self.EXPIRY_BYTES])[0]


CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")


def shown(text: str, limit: int = 200) -> str:
    """A caller's text as a log line shows it: escaped to ASCII, and cut to limit only after any
    secret in it is blanked (a secret cut short would be too short for the log's own redaction)."""
    text = ascii(text)[1:-1]
    return text if len(text) <= limit else redact(text)[:limit]


def normalize_path(target: str) -> str:
    """Resolve a request target the way a server would: one percent-decoding, then dot segments.

    Absolute-form targets lose their scheme and host; the query is dropped.
    The result is what the proxy routes on and exactly what it forwards (re-quoted).
    """
    if not target.startswith("/"):
        if target[:7].lower() == "http://" or target[:8].lower() == "https://":
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        else:
            raise HttpError(400, "request target is not a path", close=True)
    path = target.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        try:
            path = urllib.parse.unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise HttpError(400, "path is not UTF-8", close=True) from None
    if CONTROL_CHAR.search(path):
        raise HttpError(400, "control character in path", close=True)
    path = path.replace("\\", "/")
    if "//" not in path and "/." not in path:
        return path
    segments = resolve_dots(path.split("/")[1:])
    trailing = path.rsplit("/", 1)[-1] in ("", ".", "..") and bool(segments)
    return "/" + "/".join(segments) + ("/" if trailing else "")


def resolve_dots(segments) -> List[str]:
    """Segments with `.`, `..` and empty ones resolved, as a server resolves them."""
    resolved: List[str] = []
    for segment in segments:
        if segment == "..":
            if resolved:
                resolved.pop()
        elif segment not in (".", ""):
            resolved.append(segment)
    return resolved


MAX_DECODINGS = 8   # a path still changing after this many percent-decodings is refused anyway


def path_readings(path: str) -> List[str]:
    """Every way a server behind the proxy might read a path: decoded again until it stops
    changing, with and without `;` parameters, cut at `?` or `#`, case folded."""
    decoded = path
    for _ in range(MAX_DECODINGS):
        again = urllib.parse.unquote(decoded) if "%" in decoded else decoded
        if again == decoded:
            break
        decoded = again
    readings = []
    for text in {path, decoded}:
        text = text.replace("\\", "/").casefold()
        for variant in (text, text.split("?", 1)[0].split("#", 1)[0]):
            readings.append(variant)
            readings.append("/".join(segment.split(";", 1)[0] for segment in variant.split("/")))
    return readings


def as_read(segment: str) -> str:
    """A segment as a lenient server may read it: spaces around it, and trailing dots, dropped."""
    segment = segment.strip()
    return segment if segment in (".", "..") else segment.rstrip(". ")


def names_credentials(path: str) -> bool:
    """Whether any reading of path names iam/, security-credentials* or identity-credentials."""
    for reading in path_readings(path):
        for segment in resolve_dots(as_read(segment) for segment in reading.split("/")):
            if segment in ("iam", "identity-credentials") or segment.startswith("security-credentials"):
                return True
    return False


def canonical(path: str) -> bool:
    """A path decoded once is canonical when no server can read it otherwise: no `%` left, no `;`."""
    return "%" not in path and ";" not in path


def forward_keys(path: str) -> List[Tuple[str, str]]:
    """Every reading of a path (path_readings) as (version, the rest), as the forward rule matches it."""
    keys = []
    for reading in path_readings(path):
        segments = resolve_dots(segment.strip() for segment in reading.split("/"))
        keys.append((segments[0] if segments else "", "/".join(segments[1:])))
    return keys


def leads_to(rest: str, pattern: str) -> bool:
    """Whether rest is a directory on the way to what pattern names (it lists a path pattern allows)."""
    segments = pattern.split("/")
    depth = rest.count("/") + 1 if rest else 0
    return depth < len(segments) and (depth == 0 or fnmatch.fnmatchcase(rest, "/".join(segments[:depth])))


def forward_allows(rule: ForwardRule, version: str, rest: str) -> bool:
    """Whether the forward rule lets a container read one reading of a path.

    The root (the list of versions) is always allowed; an allow-list needs a real version,
    and allows the directories leading to what it names, so that a client can walk to them.
    """
    for pattern in rule.deny:
        if fnmatch.fnmatchcase(rest, pattern) or fnmatch.fnmatchcase(rest, pattern + "/*"):
            return False
    if rule.allow is None or not version:
        return True
    if not VALID_VERSION.match(version):
        return False
    return any(fnmatch.fnmatchcase(rest, pattern) or leads_to(rest, pattern) for pattern in rule.allow)


def forwardable(rule: ForwardRule, path: str) -> bool:
    """Whether every reading of a (canonical) path is allowed: no spelling gets around the rule."""
    return all(forward_allows(rule, version, rest) for version, rest in forward_keys(path))


def listing_shown(rule: ForwardRule, path: str, body: bytes) -> bytes:
    """A directory listing with the children the rule refuses left out; any other answer unchanged.

    An answer is taken as a listing when its path ends in `/`, is a version, or leads to a pattern.
    """
    version, rest = forward_keys(path)[0]
    patterns = (rule.allow or ()) + rule.deny
    if not version or not (path.endswith("/") or not rest or any(leads_to(rest, p) for p in patterns)):
        return body
    lines = body.decode("utf-8", "replace").split("\n")
    prefix = rest + "/" if rest else ""
    kept = [line for line in lines
            if line and forward_allows(rule, version, prefix + line.strip().rstrip("/").casefold())]
    return "\n".join(kept).encode()


@dataclasses.dataclass
class Answer:
    """One response: status, body and extra headers."""

    status: int
    body: bytes = b""
    headers: Tuple[Tuple[str, str], ...] = ()


class Request:
    """One parsed request, and who it turned out to be from (for the log line)."""

    __slots__ = ("method", "target", "version", "headers", "source", "container", "role", "route", "settings")

    def __init__(self, method: str, target: str, version: str, headers: Mapping[str, str], source: str):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.source = source
        self.container = "-"
        self.role = "-"
        self.route = "unrouted"   # the handler that answered it, for the metrics
        self.settings: Optional["ServiceSettings"] = None   # the config in force when it arrived


NOT_FOUND = b"404 - Not Found"


def imds_version(request: Request) -> str:
    """Whether the request carried an IMDSv2 token ("v2", checked by then) or not ("v1")."""
    return "v2" if TOKEN_HEADER in request.headers else "v1"


def text_answer(status: int, text: str) -> Answer:
    return Answer(status, text.encode())


def error_answer(exc: HttpError) -> Answer:
    """A refusal worded as IMDS words it ("404 - Not Found"); a 405 has only its Allow header."""
    body = b"" if exc.status == 405 else f"{exc.status} - {STATUS_TEXT[exc.status]}".encode()
    return Answer(exc.status, body, exc.headers)


def credential_error_answer(exc: CredentialError, now: float) -> Answer:
    """No credentials for this container (STS failed): 503 with IMDS's JSON error shape."""
    error = {"Code": exc.code, "Message": "the proxy could not get credentials for this container",
             "LastUpdated": iso8601(now)}
    return Answer(503, json.dumps(error, indent=2).encode())


REGION_PATH = "/latest/meta-data/placement/region"
REGION_NAME = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$")


class MetadataUpstream:
    """The host's real metadata service over kept-alive connections, with the proxy's own IMDSv2 token."""

    TOKEN_TTL = MAX_TOKEN_TTL
    TOKEN_EARLY = 300   # seconds before its expiry the proxy takes a new host token
    V1_RECHECK = 300    # seconds before asking again a service that answered as IMDSv1 only
    MAX_BODY = 1 << 20

    def __init__(self, url: str, connect_timeout: float = 1.0, read_timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, pool_size: int = 8):
        parts = urllib.parse.urlsplit(url)
        self.url = url
        self._host = parts.hostname
        self._port = parts.port or 80
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._clock = clock
        self._pool_size = pool_size
        self._idle: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._token: Optional[str] = None
        self._token_expiry = 0.0
        self._v1_until = 0.0
        self.reachable: Optional[bool] = None

    def _request(self, method: str, path: str, headers: Dict[str, str]):
        """One request with one retry when a kept-alive connection turns out to be closed."""
        for attempt in (0, 1):
            with self._lock:
                conn = self._idle.pop() if self._idle and attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout)
            try:
                if conn.sock is None:
                    conn.connect()
                    conn.sock.settimeout(self._read_timeout)
                conn.request(method, path, headers=headers)
                response = conn.getresponse()
                length = response.getheader("Content-Length")
                if length is not None and DECIMAL.match(length) and int(length) > self.MAX_BODY:
                    raise HttpError(502, "answer too large")
                # Read even for HEAD (http.client gives b""): an unread answer leaves the kept-alive
                # connection unusable, and the next request on it would fail.
                body = response.read(self.MAX_BODY + 1)
                if len(body) > self.MAX_BODY:
                    raise HttpError(502, "answer too large")
            except HttpError:
                conn.close()
                raise
            except socket.timeout:
                conn.close()
                raise HttpError(504, "timed out") from None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if reused:
                    continue   # the server closed an idle kept-alive connection; try a fresh one
                raise HttpError(502, "connection closed") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise HttpError(502, getattr(exc, "strerror", None) or type(exc).__name__) from None
            if response.will_close:
                conn.close()
            else:
                with self._lock:
                    if len(self._idle) < self._pool_size:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()
            return response.status, response.getheader("Location"), body
        raise HttpError(502, "connection closed")

    def _host_token(self) -> Optional[str]:
        """The proxy's own IMDSv2 token, or None where the host service speaks IMDSv1 only."""
        now = self._clock()
        if self._token and now < self._token_expiry:
            return self._token
        if now < self._v1_until:
            return None
        status, _, body = self._request("PUT", "/latest/api/token", {TOKEN_TTL_HEADER: str(self.TOKEN_TTL)})
        if status == 200:
            self._token = body.decode("ascii", "replace").strip()
            self._token_expiry = now + self.TOKEN_TTL - self.TOKEN_EARLY
            return self._token
        if status in (403, 404, 405):
            self._v1_until = now + self.V1_RECHECK
            return None
        raise HttpError(502, f"token request answered {status}")

    def fetch(self, method: str, path: str,
              before_call: Optional[Callable[[], None]] = None) -> Tuple[int, Optional[str], bytes]:
        """Forward a GET or HEAD; returns (status, Location, body); raises HttpError.

        before_call: run first (ForwardBudget: wait for this call's turn, or refuse it).
        """
        if before_call is not None:
            before_call()
        for attempt in (0, 1):
            token = self._host_token()
            headers = {TOKEN_HEADER: token} if token else {}
            status, location, body = self._request(method, urllib.parse.quote(path, safe="/-._~!$&'()*+,;=:@"),
                                                   headers)
            if status == 401 and token and attempt == 0:
                self._token = None   # the host token expired or the service restarted
                continue
            return status, location, body
        return status, location, body

    def region(self) -> Optional[str]:
        """The instance's region from placement/region, or None if the service does not say."""
        try:
            status, _, body = self.fetch("GET", REGION_PATH)
        except HttpError:
            return None
        region = body.decode("ascii", "replace").strip()
        return region if status == 200 and REGION_NAME.match(region) else None

    def probe(self) -> bool:
        """Try the service once (start-up); log once when it is or is not reachable."""
        try:
            self._host_token()
            self.fetch("GET", "/latest/meta-data/instance-id")
        except HttpError as exc:
            if self.reachable is not False:
                log.warning("the metadata service at %s is not reachable yet (%s); forwarded paths "
                            "answer 502/504 until it is; retrying", self.url, exc)
            self.reachable = False
            return False
        if self.reachable is not True:
            log.info("the metadata service at %s is reachable", self.url)
        self.reachable = True
        return True


# Paths whose answer does not change while the instance runs; anything else (spot and
# rebalance notices, events, credentials, ...) is always asked.
STATIC_PATHS = re.compile(
    r"^/(latest|[0-9]{4}-[0-9]{2}-[0-9]{2}|1\.0)/(meta-data/(ami-id|instance-id|instance-type|local-hostname|"
    r"local-ipv4|mac|placement/(availability-zone|availability-zone-id|region|group-name|host-id|"
    r"partition-number))|dynamic/instance-identity/document)$")
STATIC_TTL = 60.0   # seconds an answer to a static path is kept
FLIGHT_WAIT = 10.0  # seconds a request waits for another's upstream call (which has its own timeouts)


class _Flight:
    """One upstream call for a static path, and its outcome for everyone who waited on it."""

    def __init__(self):
        self.done = threading.Event()
        self.answer: Optional[Tuple[int, Optional[str], bytes]] = None
        self.error: Optional[HttpError] = None
        self.handed_back = False   # its leader was refused its turn (ForwardBudget): another leads


class StaticCache:
    """Keeps 200 answers to the static paths STATIC_TTL seconds; one upstream call per path at a time.

    The host's service allows an instance about 1,024 packets a second: containers polling
    their instance id must not spend them for the whole host. Wraps MetadataUpstream's fetch.
    """

    LEADS = 3   # a request that finds its path's call handed back this often is answered 503

    def __init__(self, upstream, ttl: float = STATIC_TTL, clock: Callable[[], float] = time.monotonic):
        self._upstream = upstream
        self._ttl = ttl
        self._clock = clock
        self._answers: Dict[str, Tuple[float, Tuple[int, Optional[str], bytes]]] = {}
        self._flights: Dict[str, _Flight] = {}
        self._lock = threading.Lock()

    def fetch(self, method: str, path: str,
              before_call: Optional[Callable[[], None]] = None) -> Tuple[int, Optional[str], bytes]:
        """The answer kept, or the one another request is fetching, or a call. before_call runs
        only in the request that makes the call: an answer kept or shared costs nothing."""
        if method != "GET" or not STATIC_PATHS.match(path):
            return self._upstream.fetch(method, path, before_call)
        for _ in range(self.LEADS):
            with self._lock:
                kept = self._answers.get(path)
                if kept is not None and self._clock() < kept[0]:
                    return kept[1]
                flight = self._flights.get(path)
                leading = flight is None
                if leading:
                    flight = self._flights[path] = _Flight()
            if leading:
                return self._lead(flight, method, path, before_call)
            answer = self._follow(flight)
            if answer is not None:
                return answer
        raise HttpError(503, "the metadata service call for this path was handed back", headers=(("Retry-After", "1"),))

    def _lead(self, flight: _Flight, method: str, path: str,
              before_call: Optional[Callable[[], None]]) -> Tuple[int, Optional[str], bytes]:
        """Make the call for everyone waiting on flight; if this request may not, hand it back."""
        try:
            if before_call is not None:
                before_call()
        except HttpError:
            flight.handed_back = True   # a refused leader's refusal is its own: the others try again
            raise
        else:
            try:
                flight.answer = self._upstream.fetch(method, path)
                return flight.answer
            except HttpError as exc:
                flight.error = exc
                raise
        finally:
            with self._lock:
                del self._flights[path]
                if flight.answer is not None and flight.answer[0] == 200:
                    self._answers[path] = (self._clock() + self._ttl, flight.answer)
            flight.done.set()

    @staticmethod
    def _follow(flight: _Flight) -> Optional[Tuple[int, Optional[str], bytes]]:
        """The outcome of the call another request is making for the same path (None: handed back)."""
        if not flight.done.wait(FLIGHT_WAIT):
            raise HttpError(504, "timed out waiting for the metadata service")
        if flight.answer is not None:
            return flight.answer
        if flight.handed_back:
            return None
        error = flight.error
        raise HttpError(error.status if error else 502, str(error) if error else "the metadata service did not answer")


class ForwardBudget:
    """Calls to the host's metadata service, which allows the instance about 1,024 packets a
    second for it, DNS and NTP together: that budget is the host's, not one container's.

    A call waits its turn among its caller's calls (a container, by id, whatever its
    addresses; an unknown caller by address), and then among every caller's. Past its
    caller's longest wait it is 429 and the connection closes (a flood); past the host's,
    503 with Retry-After (the host is busy, not this caller's doing).
    """

    REMEMBERED = 10000   # callers with a bucket; forgetting them all only refills their bursts

    def __init__(self, rate: float, burst: float, caller_wait: float, host_rate: float, host_burst: float,
                 host_wait: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self._rate = rate
        self._burst = burst
        self._caller_wait = caller_wait
        self._host_wait = host_wait
        self._clock = clock
        self._sleep = sleep
        self._host = TokenBucket(host_rate, host_burst, clock)
        self._callers: Dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def admit(self, caller: str) -> float:
        """Seconds the call must wait for its turn (0: go now), its place taken; else HttpError."""
        with self._lock:
            bucket = self._callers.get(caller)
            if bucket is None:
                if len(self._callers) >= self.REMEMBERED:
                    self._callers.clear()
                bucket = self._callers[caller] = TokenBucket(self._rate, self._burst, self._clock)
            own = bucket.reserve(self._caller_wait)
            if own is None:
                raise HttpError(429, "over this caller's rate of calls to the host's metadata service",
                                close=True)
            host = self._host.reserve(self._host_wait)
            if host is None:
                bucket.refund()   # not this caller's doing: its own budget is not spent
                raise HttpError(503, "the host's metadata service is asked as often as it may be",
                                headers=(("Retry-After", "1"),))
        return max(own, host)

    def spend(self, caller: str) -> None:
        """Wait for the call's turn (outside any lock), or raise HttpError."""
        wait = self.admit(caller)
        if wait > 0:
            self._sleep(wait)


class MockMetadata:
    """A built-in metadata tree for running outside EC2 (mock mode); credentials stay real."""

    def __init__(self, region: str):
        self._files = {
            "meta-data/ami-id": "ami-0123456789abcdef0",
            "meta-data/hostname": "ip-127-0-0-1.ec2.internal",
            "meta-data/instance-id": "i-0123456789abcdef0",
            "meta-data/instance-type": "t3.micro",
            "meta-data/local-hostname": "ip-127-0-0-1.ec2.internal",
            "meta-data/local-ipv4": "127.0.0.1",
            "meta-data/mac": "02:00:00:00:00:01",
            "meta-data/placement/availability-zone": region + "a",
            "meta-data/placement/region": region,
            "meta-data/services/domain": "amazonaws.com",
            "meta-data/services/partition": "aws",
            "dynamic/instance-identity/document": json.dumps({
                "accountId": "000000000000", "architecture": "x86_64",
                "availabilityZone": region + "a", "imageId": "ami-0123456789abcdef0",
                "instanceId": "i-0123456789abcdef0", "instanceType": "t3.micro",
                "privateIp": "127.0.0.1", "region": region, "version": "2017-09-30"}, indent=2),
        }
        self._dirs: Dict[str, set] = {}
        for name in self._files:
            parts = name.split("/")
            for depth in range(len(parts)):
                child = parts[depth] + ("/" if depth < len(parts) - 1 else "")
                self._dirs.setdefault("/".join(parts[:depth]), set()).add(child)
        self._dirs["meta-data"].add("iam/")

    def answer(self, path: str) -> Tuple[int, Optional[str], bytes]:
        if path == "/":
            return 200, None, b"1.0\nlatest"
        relative = path.strip("/").split("/", 1)[1] if path.strip("/").count("/") else ""
        trailing = path.endswith("/")
        if relative in self._files and not trailing:
            return 200, None, self._files[relative].encode()
        if relative in self._dirs:
            if not trailing:
                return 301, path + "/", b""
            return 200, None, "\n".join(sorted(self._dirs[relative])).encode()
        return 404, None, NOT_FOUND


# Normalised path -> handler, first match wins (like bottle's router); anything else is forwarded.
ROUTES = (
    (re.compile(r"^/[^/]+/api/token/?$", re.IGNORECASE), "token"),
    (re.compile(r"^/([^/]+)/meta-data/iam(?:/(.*))?$", re.IGNORECASE), "iam"),
    (re.compile(r"^/[^/]+/meta-data/identity-credentials(?:/.*)?$", re.IGNORECASE), "refuse"),
)
TOKEN_PATH = "latest/api/token"
NO_CALLER = Decision(None, reason="no container at this address")


class ServiceSettings(NamedTuple):
    """What a request reads of the config, swapped whole by a reload: it sees old or new, never a mix."""

    roles: RoleResolver
    require_tokens: bool
    forward_rule: ForwardRule = ForwardRule()


class MetadataService:
    """Answers one IMDS request from one source address: tokens, credentials, forwarding, refusals."""

    def __init__(self, watcher: DockerWatcher, roles: RoleResolver, credentials: CredentialCache,
                 tokens: TokenIssuer, upstream, wait_timeout: float = 0.8, resync_timeout: float = 0.3,
                 require_tokens: bool = False,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 forward_rule: ForwardRule = ForwardRule(), audit: Optional[Audit] = None,
                 forward_budget: Optional[ForwardBudget] = None):
        self.watcher = watcher
        self.forward_budget = forward_budget
        self.settings = ServiceSettings(roles, require_tokens, forward_rule)
        self.audit = audit if audit is not None else Audit()
        self.credentials = credentials
        self.tokens = tokens
        self.upstream = upstream
        self.wait_timeout = wait_timeout
        self.resync_timeout = resync_timeout
        self.clock = clock
        self.wall_clock = wall_clock
        self.routes = tuple((pattern, getattr(self, name)) for pattern, name in ROUTES)

    @property
    def roles(self) -> RoleResolver:
        return self.settings.roles

    @property
    def require_tokens(self) -> bool:
        return self.settings.require_tokens

    def caller(self, source: str, resync: bool, sure: bool = False) -> Optional[Container]:
        """The container behind a source address, or its static mapping (DockerWatcher.find).

        With resync (a credential or token request), Docker's answer must be current, waiting
        at most resync_timeout for it; a stale answer is still used (known containers are
        served while Docker is away), and said so in the debug log.
        """
        found = self.watcher.find(source, resync, self.resync_timeout)
        if resync and not found.fresh:
            if sure and found.container is None:
                # Unknown, and Docker did not say in time: a new container's, or a mapped one's?
                raise HttpError(503, "Docker did not answer in time; who this is is not known yet")
            log.debug("%s: Docker did not answer in time; using what it said last", source)
        return found.container

    def answer(self, request: Request) -> Answer:
        """Route one request to its handler; refusals are raised as HttpError or CredentialError.

        A credential answer takes at most wait_timeout, whatever STS does.
        """
        deadline = self.clock() + self.wait_timeout
        request.settings = self.settings   # read once: a reload meanwhile is this request's next one's
        path = normalize_path(request.target)
        for pattern, handler in self.routes:
            match = pattern.match(path)
            if match is not None:
                request.route = handler.__name__
                return handler(request, path, match, deadline)
        request.route = "forward"
        return self.forward(request, path, None, deadline)

    @staticmethod
    def binding(container: Optional[Container], source: str) -> str:
        return container.id if container is not None else "ip:" + source

    def authorize(self, request: Request, resync: bool, sure: bool = False) -> Optional[Container]:
        """Check the method and the IMDSv2 token of a metadata read; return the caller.

        The caller is looked up once, so the token is checked against the very container
        whose answer is given.
        """
        if request.method not in ("GET", "HEAD"):
            raise HttpError(405, "metadata is read with GET or HEAD", headers=(("Allow", "GET, HEAD"),))
        token = request.headers.get(TOKEN_HEADER)
        if token is None and request.settings.require_tokens:
            raise HttpError(401, "no token")   # IMDSv2 only, like HttpTokens=required
        container = self.caller(request.source, resync, sure)
        # A token taken while the caller was unknown is bound to its address, and stops
        # working once a container is known there: the address may have been reused.
        if token is not None and not self.tokens.valid(token, self.binding(container, request.source)):
            raise HttpError(401, "token not valid for this caller")
        return container

    def demand_token(self, request: Request, spec: Optional[RoleSpec]) -> None:
        """An alias with requireTokens: its containers' reads without a token are 401, like IMDSv2 only."""
        if spec is not None and spec.require_tokens and TOKEN_HEADER not in request.headers:
            raise HttpError(401, "no token (the container's alias requires one)")

    def token(self, request: Request, path: str, match, deadline: float) -> Answer:
        """PUT /latest/api/token: a token bound to the caller, like IMDS's."""
        if request.method != "PUT":
            raise HttpError(405, "the token path takes PUT", headers=(("Allow", "PUT"),))
        if path.strip("/").lower() != TOKEN_PATH or "x-forwarded-for" in request.headers:
            raise HttpError(403, "token request not allowed")
        ttl = request.headers.get(TOKEN_TTL_HEADER, "")
        if not DECIMAL.match(ttl) or not 1 <= int(ttl) <= MAX_TOKEN_TTL:
            raise HttpError(400, "missing or bad token TTL")
        container = self.caller(request.source, resync=True)
        if container is not None:
            request.container = container.name
        token = self.tokens.issue(self.binding(container, request.source), int(ttl))
        return Answer(200, token.encode(), (("X-aws-ec2-metadata-token-ttl-seconds", ttl),))

    def iam(self, request: Request, path: str, match, deadline: float) -> Answer:
        """A path under meta-data/iam/, answered for the calling container; never the host's."""
        container = self.authorize(request, resync=True, sure=True)
        if not VALID_VERSION.match(match.group(1)):
            raise HttpError(404, "no such metadata version")
        decision = request.settings.roles.decision_for(container) if container is not None else NO_CALLER
        spec = decision.spec
        if container is not None:
            request.container = container.name
        if spec is not None:
            request.role = spec.role_name
        self.demand_token(request, spec)
        rest = (match.group(2) or "").strip("/")
        rest = rest.split("/") if rest else []
        trailing = path.endswith("/")
        kind = rest[0].lower() if rest else ""
        directory = kind in ("security-credentials", "security-credentials-extended")
        if (not rest and not trailing) or (len(rest) == 1 and not trailing and directory):
            return Answer(301, b"", (("Location", urllib.parse.quote(path + "/")),))
        if spec is None:
            self.audit.refused(request.source, imds_version(request), container, decision, decision.reason)
            raise HttpError(404, "no role for this caller")
        if not rest:
            return text_answer(200, "info\nsecurity-credentials/")
        if kind == "info" and len(rest) == 1 and not trailing:
            return text_answer(200, self.info(spec))
        if not directory:
            raise HttpError(404, "no such path under iam/")
        if len(rest) == 1:
            return text_answer(200, spec.role_name)
        if rest[1] != spec.role_name:
            self.audit.refused(request.source, imds_version(request), container, decision,
                               f"asked for role {shown(rest[1], 64)}, not its own")
            raise HttpError(404, "another role's name")
        try:
            creds = self.credentials.get(container.id, container.name, spec, max(0.05, deadline - self.clock()),
                                         on_demand=container.static_alias is not None,
                                         current=lambda: request.settings is self.settings)
        except CredentialError as exc:
            self.audit.refused(request.source, imds_version(request), container, decision,
                               f"STS error {exc.code}")
            raise
        self.audit.handed(request.source, imds_version(request), container, decision, creds)
        return Answer(200, creds.extended_body if kind.endswith("extended") else creds.body)

    def info(self, spec: RoleSpec) -> str:
        """The container's own role as an instance profile; the host's profile is never shown."""
        partition = spec.arn.split(":")[1]
        profile_id = "AIPA" + hashlib.sha256(spec.arn.encode()).hexdigest()[:17].upper()
        return json.dumps({
            "Code": "Success",
            "LastUpdated": iso8601(self.wall_clock()),
            "InstanceProfileArn": f"arn:{partition}:iam::{spec.account_id}:instance-profile/{spec.role_name}",
            "InstanceProfileId": profile_id,
        }, indent=2)

    def refuse(self, request: Request, path: str, match, deadline: float) -> Answer:
        """meta-data/identity-credentials/: the instance's own identity, never given to a container."""
        container = self.authorize(request, resync=False)
        self.audit.refused(request.source, imds_version(request), container,
                           NO_CALLER if container is None else Decision(None), "identity-credentials are the host's")
        raise HttpError(404, "identity credentials are the host's")

    def forward(self, request: Request, path: str, match, deadline: float) -> Answer:
        """Any other path, from the host's service, if no server could read it as a credential path."""
        container = self.authorize(request, resync=False)
        if container is not None:
            request.container = container.name
            roles = request.settings.roles
            if roles.tokens_required and TOKEN_HEADER not in request.headers:
                self.demand_token(request, roles.role_for(container))
        if names_credentials(path):
            raise HttpError(404, "a reading of the path names credentials")
        if not canonical(path):
            raise HttpError(400, "only a path in its one canonical form is forwarded", close=True)
        rule = request.settings.forward_rule
        if not rule.everything and not forwardable(rule, path):
            self.audit.refused(request.source, imds_version(request), container,
                               NO_CALLER if container is None else Decision(None),
                               f"path {shown(path)} refused by the forward policy")
            raise HttpError(404, "refused by the forward policy")
        budget = self.forward_budget
        caller = self.binding(container, request.source)
        status, location, body = self.upstream.fetch(
            request.method, path, None if budget is None else lambda: budget.spend(caller))
        if status == 200 and not rule.everything:
            body = listing_shown(rule, path, body)
        extra = (("Location", urllib.parse.urlsplit(location).path or "/"),) if location else ()
        return Answer(status, body, extra)


class MockUpstream:
    """Adapts MockMetadata to the forwarding interface."""

    def __init__(self, mock: MockMetadata):
        self._mock = mock

    def fetch(self, method: str, path: str, before_call=None):
        return self._mock.answer(path)   # answered here: no call to any service, nothing to budget


#####################################################################
# HTTP server #######################################################
# Owns the listening socket, who may hold a connection and send a request (Admission),
# and a lean HTTP/1.1 reader and writer; each request goes to MetadataService.answer.

TOKEN_CHARS = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
HTTP_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")
HEAD_END = re.compile(rb"\n\r?\n")   # the empty line ending a head, whether lines end in CRLF or bare LF


@dataclasses.dataclass(frozen=True)
class Limits:
    """How much one client may send, how long it may take, and how many connections it may hold."""

    max_request_line: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body: int = 65536
    request_timeout: float = 5.0     # from a request's first byte to its last
    idle_timeout: float = 5.0        # between requests on a kept-alive connection
    max_connections: int = 512
    max_per_source: int = 32
    rate_per_source: float = 1000.0  # requests a second, sustained
    burst_per_source: float = 2000.0
    # Calls to the host's metadata service: the instance's link-local traffic (about 1,024
    # packets a second, shared with DNS and NTP) belongs to the whole host.
    # A call waits its turn, first among its container's calls, then among everyone's.
    forward_rate_per_caller: float = 20.0   # calls a second, sustained, for one container...
    forward_burst_per_caller: float = 40.0
    forward_caller_wait: float = 0.5        # ...past this wait, 429 and its connection closes
    forward_rate: float = 100.0             # calls a second for all containers together...
    forward_burst: float = 100.0
    forward_wait: float = 1.0               # ...past this wait, 503 (Retry-After)


class Connection:
    """One admitted connection: its source, its socket, and what it is doing since when."""

    __slots__ = ("source", "sock", "state", "since", "open")
    IDLE, READING, BUSY = "idle", "reading", "busy"

    def __init__(self, source: str, sock: socket.socket, now: float):
        self.source = source
        self.sock = sock
        self.state = self.IDLE   # until its first request arrives: a connection that sends nothing is idle
        self.since = now
        self.open = True


class Admission:
    """Who may hold a connection and send a request: caps per source and in total, a request
    rate per source, and room made for a newcomer by reclaiming idle and slow connections."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.draining = False
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._per_source: Dict[str, int] = {}
        self._total = 0
        self._idle: Dict[Connection, None] = {}      # in the order they became idle: oldest first
        self._reading: Dict[Connection, None] = {}   # a request begun and not yet whole
        self._buckets: Dict[str, List[float]] = {}

    @property
    def total(self) -> int:
        """Connections held now, by every source."""
        return self._total

    def open(self, source: str, sock: socket.socket) -> Optional[Connection]:
        """A record for a new connection from source, or None when it must be refused (429)."""
        victim = None
        with self._lock:
            held = self._per_source.get(source, 0)
            if self.draining or held >= self.limits.max_per_source:
                return None
            if self._total >= self.limits.max_connections:
                victim = self._victim_locked(held)
                if victim is None:
                    return None
                self._release_locked(victim)
            self._total += 1
            self._per_source[source] = held + 1
            conn = Connection(source, sock, self.clock())
            self._idle[conn] = None
        if victim is not None:
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)   # its thread wakes, finds it closed, and ends
            log.debug("closed a %s connection from %s to admit %s", victim.state, victim.source, source)
        return conn

    def _victim_locked(self, held: int) -> Optional[Connection]:
        """The connection to reclaim for a source holding `held`: the oldest idle one, else a slow
        one of the source holding the most; never one whose source would then hold less."""
        for conn in self._idle:
            if self._per_source[conn.source] > held + 1:
                return conn
        slow = [conn for conn in self._reading if self._per_source[conn.source] > held + 1]
        if not slow:
            return None
        return max(slow, key=lambda conn: (self._per_source[conn.source], -conn.since))

    def mark(self, conn: Connection, state: str) -> bool:
        """Record what conn is doing; False when it must close (reclaimed, or idle while draining)."""
        with self._lock:
            if not conn.open or (state == Connection.IDLE and self.draining):
                return False
            self._idle.pop(conn, None)
            self._reading.pop(conn, None)
            conn.state = state
            if state == Connection.IDLE:
                self._idle[conn] = None
            elif state == Connection.READING:
                conn.since = self.clock()
                self._reading[conn] = None
        return True

    def close(self, conn: Connection) -> None:
        with self._lock:
            if conn.open:
                self._release_locked(conn)

    def _release_locked(self, conn: Connection) -> None:
        conn.open = False
        self._idle.pop(conn, None)
        self._reading.pop(conn, None)
        self._total -= 1
        count = self._per_source.get(conn.source, 1) - 1
        if count:
            self._per_source[conn.source] = count
        else:
            self._per_source.pop(conn.source, None)
        if self._total == 0:
            self._drained.notify_all()

    def allow_request(self, source: str) -> bool:
        """A token bucket per source: a flood from one container gets 429s, not everyone's time.

        No lock: two requests of one source at the same instant may both see the same
        tokens, which lets one more through now and then; that is all a race can cost.
        """
        now = self.clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) > 10000:
                self._buckets.clear()
            bucket = self._buckets[source] = [self.limits.burst_per_source, now]
        tokens = min(self.limits.burst_per_source, bucket[0] + (now - bucket[1]) * self.limits.rate_per_source)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True

    def drain(self, timeout: float) -> bool:
        """Refuse new connections, close idle ones, wait (bounded) for requests in flight."""
        with self._lock:
            self.draining = True
            idle = list(self._idle)
        for conn in idle:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            return self._drained.wait_for(lambda: self._total == 0, timeout)


# recv() flags that read what has arrived without waiting (0 where the platform has none:
# then a new connection's first read waits as every other does).
EAGER_RECV = getattr(socket, "MSG_DONTWAIT", 0)


def send_all(sock: socket.socket, data: bytes, timeout: float) -> bool:
    """Write data, False when the connection is gone or the peer takes more than timeout to read it.

    An answer nearly always fits the send buffer: it goes at once, without the poll a socket
    with a time-out makes first (see RequestReader.fresh); the rest, if any, within the time-out.
    """
    try:
        sock.settimeout(0)
        try:
            sent = sock.send(data)
        except BlockingIOError:   # the buffer is full: the peer has not read an earlier answer
            sent = 0
        if sent < len(data):
            sock.settimeout(timeout)
            sock.sendall(memoryview(data)[sent:])
    except OSError:
        return False
    return True


class RequestReader:
    """Reads whole requests off one connection, linear in what arrives and within Limits,
    and tells Admission whether the connection is idle, half-sent or busy."""

    def __init__(self, sock: socket.socket, conn: Connection, admission: Admission, limits: Limits,
                 clock: Callable[[], float]):
        self.sock = sock
        self.conn = conn
        self.admission = admission
        self.limits = limits
        self.clock = clock
        self.buffer = b""
        self.peer_closed = False
        # A new connection's first request has nearly always arrived by the time its thread
        # reads: taken without a wait, it costs one system call instead of poll and recv, and
        # every system call here gives up the interpreter lock and queues to take it back.
        self.fresh = EAGER_RECV != 0

    def receive_now(self) -> Optional[bytes]:
        """What has arrived on a new connection, without waiting; None if nothing has yet."""
        self.fresh = False
        try:
            return self.sock.recv(65536, EAGER_RECV)   # the socket is still blocking, as accepted
        except BlockingIOError:
            return None

    def read_head(self) -> Optional[bytes]:
        """The next request's head once all of it is here; None on a clean close or an idle timeout."""
        limits = self.limits
        buffer = self.buffer
        searched = 0
        deadline = None
        while True:
            end = HEAD_END.search(buffer, max(0, searched - 2))   # from where the last search stopped: linear
            if end is not None:
                self.buffer = buffer[end.end():]
                if self.conn.state != Connection.BUSY and not self.admission.mark(self.conn, Connection.BUSY):
                    return None
                return buffer[:end.start()]
            searched = len(buffer)
            if searched > limits.max_request_line and buffer.find(b"\n", 0, limits.max_request_line) < 0:
                raise HttpError(414, "request line too long")
            if searched > limits.max_request_line + limits.max_header_bytes:
                raise HttpError(431, "headers too large")
            if buffer and deadline is None:
                deadline = self.clock() + limits.request_timeout
                if not self.admission.mark(self.conn, Connection.READING):
                    return None
            if deadline is None:
                # A new connection starts idle: marking it costs its first request nothing.
                if self.conn.state != Connection.IDLE and not self.admission.mark(self.conn, Connection.IDLE):
                    return None
                timeout = limits.idle_timeout
            else:
                timeout = deadline - self.clock()
                if timeout <= 0:
                    raise HttpError(408, "request not received in time")
            chunk = self.receive_now() if self.fresh else None
            if chunk is None:
                self.sock.settimeout(timeout)
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    if deadline is None:
                        return None
                    raise HttpError(408, "request not received in time") from None
            if not chunk:
                self.peer_closed = True
                return None
            buffer += chunk

    def parse(self, head: bytes) -> Request:
        """The request line and headers; any malformation is HttpError."""
        limits = self.limits
        if b"\0" in head:
            raise HttpError(400, "NUL byte in request")
        lines = head.split(b"\n")
        request_line = lines[0].rstrip(b"\r")
        if len(request_line) > limits.max_request_line:
            raise HttpError(414, "request line too long")
        parts = request_line.split(b" ")
        if len(parts) != 3:
            raise HttpError(400, "malformed request line")
        method, target, version = parts
        if not TOKEN_CHARS.match(method):
            raise HttpError(400, "malformed method")
        match = HTTP_VERSION.match(version)
        if not match:
            raise HttpError(400, "malformed HTTP version")
        if match.group(1) != b"1":
            raise HttpError(505, "unsupported HTTP version")
        if len(lines) - 1 > limits.max_headers:
            raise HttpError(431, "too many headers")
        if len(head) - len(lines[0]) > limits.max_header_bytes:
            raise HttpError(431, "headers too large")
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            line = line.rstrip(b"\r")
            name, colon, value = line.partition(b":")
            if not colon or not TOKEN_CHARS.match(name):
                raise HttpError(400, "malformed header")
            key = name.decode("ascii").lower()
            text = value.strip(b" \t").decode("latin-1")
            if key in headers:
                if key in ("content-length", "host", "transfer-encoding") and headers[key] != text:
                    raise HttpError(400, f"conflicting {key} headers")
                continue
            headers[key] = text
        return Request(method.decode("ascii"), target.decode("latin-1"), version.decode("ascii"), headers,
                       self.conn.source)

    def discard_body(self, request: Request) -> None:
        """IMDS takes no request body: refuse Transfer-Encoding and a body on GET or HEAD; read
        and drop any other (a PUT's), byte count only, by the request deadline."""
        if "transfer-encoding" in request.headers:
            raise HttpError(400, "Transfer-Encoding: IMDS takes no request body")
        length = request.headers.get("content-length")
        if length is None or length == "0":
            return
        if not DECIMAL.match(length):
            raise HttpError(400 if not length.isdigit() else 413, "malformed or huge content-length")
        remaining = int(length)
        if request.method in ("GET", "HEAD") and remaining:
            raise HttpError(400, f"a body on a {request.method}")
        if remaining > self.limits.max_body:
            raise HttpError(413, "request body too large")
        if len(self.buffer) >= remaining:
            self.buffer = self.buffer[remaining:]
            return
        remaining -= len(self.buffer)
        self.buffer = b""
        # Waiting for a body is as slow as waiting for a head: reclaimable under pressure.
        if not self.admission.mark(self.conn, Connection.READING):
            raise HttpError(408, "connection reclaimed while its body was awaited", close=True)
        deadline = self.clock() + self.limits.request_timeout
        while remaining > 0:
            timeout = deadline - self.clock()
            if timeout <= 0:
                raise HttpError(408, "request body not received in time")
            self.sock.settimeout(timeout)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise HttpError(408, "request body not received in time") from None
            if not chunk:
                raise HttpError(400, "connection closed inside the body")
            remaining -= len(chunk)
        self.buffer = chunk[len(chunk) + remaining:]
        if not self.admission.mark(self.conn, Connection.BUSY):
            raise HttpError(408, "connection reclaimed while its body was awaited", close=True)

# Field names of an access line, in its text order; JSON log lines carry them as keys (see README).
ACCESS_FIELDS = ("source", "container", "role", "method", "path", "status", "ms")
ACCESS_TEXT = "%s %s %s %s %s %d %.1fms"


@functools.lru_cache(maxsize=4)
def http_date(second: int) -> str:
    """The Date header's text; made once a second, not once a request."""
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))


class ImdsRequestHandler(socketserver.BaseRequestHandler):
    """Serves one connection, one request at a time: read, answer, log, send (handle_one_request).

    It takes its parts from the server once (service, limits, admission, clocks); its
    RequestReader reports the connection's state to Admission. It never touches another connection.
    """

    def __init__(self, request, client_address, server, conn: Connection):
        self.conn = conn
        super().__init__(request, client_address, server)

    def setup(self):
        server = self.server
        self.service = server.service
        self.limits = server.limits
        self.admission = server.admission
        self.wall_clock = server.wall_clock
        self.keep_alive_header = server.keep_alive_header
        self.metrics = server.metrics
        self.events = server.events
        self.reader = RequestReader(self.request, self.conn, server.admission, server.limits, server.clock)
        self.closed_as_asked = False

    def handle(self):
        while self.handle_one_request():
            pass

    def handle_one_request(self) -> bool:
        """Read one request, answer it, log it and send the answer; False when the connection is done."""
        request = None
        started = time.perf_counter()
        try:
            head = self.reader.read_head()
            if head is None:
                return False
            started = time.perf_counter()   # the request is here: idle time is not its time
            parsed = self.reader.parse(head)
            self.reader.discard_body(parsed)
            request = parsed   # read whole: the connection can go on after this one
            if not self.admission.allow_request(request.source):
                raise HttpError(429, "over the request rate", close=True)
            answer = self.service.answer(request)
            keep = self.keep_alive(request)
            self.closed_as_asked = self.last_as_asked(request, keep)
        except HttpError as exc:
            # The one place a refusal becomes an answer. One the reader raised leaves the
            # stream where no next request can be found: the connection closes.
            answer, keep = error_answer(exc), request is not None and not exc.close and self.keep_alive(request)
            self.closed_as_asked = not exc.close and self.last_as_asked(request, keep)
            self.log_error(request, exc)
        except CredentialError as exc:
            log.debug("no credentials for %s: %s", request.container, exc)
            answer, keep = credential_error_answer(exc, self.wall_clock()), self.keep_alive(request)
            self.closed_as_asked = self.last_as_asked(request, keep)
        except OSError:
            if request is None:
                return False   # the connection broke while the request was being read
            answer, keep = self.internal_error(request), False
        except Exception:   # a bug must cost one request, not the connection thread's silence
            answer, keep = self.internal_error(request), False
        # Logged before the answer goes out: once a client has its answer it opens its next
        # connection, and work left after sending would pile up behind it.
        self.log_request(request, answer.status, started)
        self.metrics.request_done(request.route if request else "unparsed", answer.status,
                                  time.perf_counter() - started)
        return self.send(request, answer, keep) and keep

    def last_as_asked(self, request: Optional[Request], keep: bool) -> bool:
        """keep_alive() ends the connection here (the client's Connection header, or a drain), and
        nothing was sent past this request."""
        return request is not None and not keep and not self.reader.buffer

    @property
    def ended_cleanly(self) -> bool:
        """Nothing the client sent is left unread: it closed first, or it asked this answer to be
        the last and sent nothing past it. Then close() alone ends the connection with a FIN;
        otherwise the kernel would answer the unread bytes with a reset (MetadataProxyServer)."""
        return self.reader.peer_closed or self.closed_as_asked

    def internal_error(self, request: Optional[Request]) -> Answer:
        log.exception("error answering %s from %s", shown(request.target) if request else "-",
                      self.conn.source)
        return text_answer(500, "500 - Internal Server Error")

    def keep_alive(self, request: Request) -> bool:
        connection = request.headers.get("connection", "").lower()
        if self.admission.draining:
            return False
        if request.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    def log_request(self, request: Optional[Request], status: int, started: float) -> None:
        """One line per request at INFO: source, container, role, method, path, status, ms."""
        if log.isEnabledFor(logging.INFO):
            if request is None:
                args = (self.conn.source, "-", "-", "-", "-", status, (time.perf_counter() - started) * 1000)
            else:
                args = (request.source, request.container, request.role, shown(request.method, 20),
                        shown(request.target), status, (time.perf_counter() - started) * 1000)
            self.events.write(ACCESS_TEXT, args, ACCESS_FIELDS, "access")

    def log_error(self, request: Optional[Request], exc: HttpError) -> None:
        """Why a request was refused, at DEBUG (the reason never holds a secret)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s: %d %s", self.conn.source, shown(request.target) if request else "-",
                      exc.status, exc)

    def send(self, request: Optional[Request], answer: Answer, keep: bool) -> bool:
        """Write one answer; False when the connection is gone."""
        version = request.version if request is not None else "HTTP/1.1"
        body = b"" if request is not None and request.method == "HEAD" else answer.body
        lines = [f"HTTP/1.1 {answer.status} {STATUS_TEXT.get(answer.status, 'Unknown')}\r\n"
                 f"Server: EC2ws\r\nDate: {http_date(int(self.wall_clock()))}\r\nContent-Type: text/plain\r\n"
                 f"Content-Length: {len(answer.body)}\r\n"]
        for name, value in answer.headers:
            lines.append(f"{name}: {value}\r\n")
        if not keep:
            lines.append("Connection: close\r\n")
        elif version == "HTTP/1.0":
            lines.append("Connection: keep-alive\r\n")
        lines.append(self.keep_alive_header if keep else "")
        lines.append("\r\n")
        return send_all(self.request, "".join(lines).encode("latin-1") + body, self.limits.request_timeout)


class MetadataProxyServer(socketserver.TCPServer):
    """The listening socket: admits each connection (verify_request) and serves it on a thread.

    A thread whose connection has ended waits a while for the next one instead of exiting,
    so a client that opens a connection per request (as most SDKs do) does not pay for
    starting a thread each time.
    """

    # TCPServer, not HTTPServer: that one's server_bind does a reverse DNS lookup of the address.
    allow_reuse_address = True
    request_queue_size = 1024
    worker_idle = 10.0   # seconds a connection thread waits for the next connection

    def __init__(self, address: Tuple[str, int], service: MetadataService, limits: Limits = Limits(),
                 handler=ImdsRequestHandler, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, metrics: Optional[ProxyMetrics] = None,
                 events: Optional["EventLog"] = None):
        host, port = address
        self.metrics = metrics if metrics is not None else ProxyMetrics()
        self.events = events if events is not None else EventLog()
        if host in ("", "::") or ":" in host:
            self.address_family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
            host = host or ("::" if socket.has_ipv6 else "0.0.0.0")
        self.service = service
        self.limits = limits
        self.clock = clock
        self.wall_clock = wall_clock
        self.admission = Admission(limits, clock)
        self.keep_alive_header = f"Keep-Alive: timeout={int(limits.idle_timeout)}\r\n"
        self._admitted: Dict[socket.socket, Connection] = {}   # verify_request -> process_request (accept thread)
        self._lock = threading.Lock()
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._idle_workers = 0   # threads waiting for a connection, less connections handed to them
        super().__init__((host, port), handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            # Dual-stack, like Go's ":18000": IPv4 callers arrive as ::ffff:a.b.c.d.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
        self._family = int(self.address_family)

    def get_request(self):
        # socket.accept() converts the listening socket's family and type to enums for
        # every connection; plain integers make the same socket for a fraction of the cost.
        fd, address = self.socket._accept()
        return socket.socket(self._family, socket.SOCK_STREAM, 0, fileno=fd), address

    def verify_request(self, request, client_address) -> bool:
        """The connection caps: admit, making room for a newcomer if need be, or answer 429 and close."""
        source = normalize_ip(client_address[0])
        conn = self.admission.open(source, request)
        if conn is None:
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(b"HTTP/1.1 429 Too Many Requests\r\nServer: EC2ws\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            log.debug("refused a connection from %s: over the connection cap", source)
            self.metrics.connections_refused.inc()
            return False
        self._admitted[request] = conn
        return True

    def process_request(self, request, client_address):
        job = (request, client_address, self._admitted.pop(request))
        with self._lock:
            if self._idle_workers:
                self._idle_workers -= 1
                self._jobs.put(job)
                return
        try:
            threading.Thread(target=self._worker, args=(job,), daemon=True).start()
        except RuntimeError:   # no thread could be started
            self.admission.close(job[2])
            self.shutdown_request(request)

    def _worker(self, job) -> None:
        while job is not None:
            self.serve_connection(*job)
            job = self._next_job()

    def _next_job(self):
        """The next connection for this thread, or None when it has waited long enough."""
        with self._lock:
            self._idle_workers += 1
        try:
            return self._jobs.get(timeout=self.worker_idle)
        except queue.Empty:
            with self._lock:
                if not self._jobs.empty():
                    return self._jobs.get_nowait()   # handed over as the wait ended
                self._idle_workers -= 1
                return None

    def serve_connection(self, request, client_address, conn: Connection) -> None:
        handler = None
        try:
            handler = self.RequestHandlerClass(request, client_address, self, conn)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.admission.close(conn)
            if getattr(handler, "ended_cleanly", False):
                # close() alone (this thread is the socket's only owner, with no makefile()): one
                # system call fewer than socketserver's shutdown() first, on nearly every connection.
                self.close_request(request)
            else:
                # Unread bytes may wait: the FIN that shutdown() sends goes out before the
                # kernel's reset, so the client reads its answer to a clean end of stream.
                self.shutdown_request(request)

    def handle_error(self, request, client_address):
        log.exception("unexpected error on the connection from %s", client_address[0])

    def drain(self, timeout: float) -> bool:
        """Stop taking new requests, close idle connections, wait for requests in flight."""
        return self.admission.drain(timeout)


#####################################################################
# Admin #############################################################
# Owns the operator's listener: liveness, readiness, metrics and the container index,
# on a loopback address or a unix socket only, never on the container-facing port.

CREDENTIAL_FLOOR = 1800.0   # seconds: no credentials held may come closer to expiry than this
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def dropped_log_lines() -> int:
    """Log lines dropped so far by the queue handlers on the root logger (configure_logging's)."""
    return sum(getattr(handler, "dropped_total", 0) for handler in logging.getLogger().handlers)


class AdminService:
    """Answers the admin paths from the parts' own state: nothing here calls Docker, STS or IMDS."""

    def __init__(self, metrics: ProxyMetrics, watcher: DockerWatcher, index: ContainerIndex,
                 lifecycle: ContainerLifecycle, credentials: CredentialCache, upstream, mock: bool = False):
        self.metrics = metrics
        self.watcher = watcher
        self.index = index
        self.lifecycle = lifecycle   # its roles are the ones in force, after any reload
        self.credentials = credentials
        self.upstream = upstream
        self.mock = mock
        metrics.add(Gauge("ec2metaproxy_containers_known", "Containers Docker reported, in the index.",
                          read=lambda: len(index)))
        metrics.add(Gauge("ec2metaproxy_credentials_cached", "Credentials held in the cache.",
                          read=lambda: credentials.counts()["fetched"]))
        metrics.add(Counter("ec2metaproxy_sts_throttles_total", "AssumeRole calls STS answered with Throttling.",
                            read=lambda: credentials.pacer.throttles))
        metrics.add(Counter("ec2metaproxy_log_lines_dropped_total",
                            "Log lines dropped because the log output was not keeping up.", read=dropped_log_lines))
        self.routes = {"/healthz": self.healthz, "/readyz": self.readyz, "/metrics": self.prometheus,
                       "/containers": self.containers}

    def answer(self, method: str, target: str) -> Tuple[int, str, bytes, Tuple[Tuple[str, str], ...]]:
        """(status, content type, body, extra headers) for one request."""
        route = self.routes.get(urllib.parse.urlsplit(target).path)
        if route is None:
            return 404, "text/plain", b"404 - Not Found\n", ()
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"405 - Method Not Allowed\n", (("Allow", "GET, HEAD"),)
        status, content_type, body = route()
        return status, content_type, body, ()

    @staticmethod
    def _json(status: int, document) -> Tuple[int, str, bytes]:
        return status, "application/json", (json.dumps(document, indent=2) + "\n").encode()

    def healthz(self) -> Tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    def readiness(self) -> Dict[str, object]:
        """Each part's state and whether it is ready; `failing` names the parts that are not."""
        docker = self.watcher.status()
        docker["ok"] = bool(docker["reachable"] and docker["following_events"])
        last = self.metrics.sts_last()
        aliases = {}
        for alias, outcome in sorted(last.items()):
            aliases[alias] = {
                "last_success": iso8601(outcome["success"]) if "success" in outcome else None,
                "last_failure": iso8601(outcome["failure"]) if "failure" in outcome else None,
                "last_error": outcome.get("error")}
        # Failing while a container's credentials cannot be fetched; not for one that has gone.
        failing = {self.metrics.alias_of(arn): code for arn, code in sorted(self.credentials.failing().items())}
        sts = {"ok": not failing, "failing_aliases": failing, "aliases": aliases}
        if self.mock:
            metadata = {"ok": True, "mock": True, "reachable": None}
        else:
            reachable = getattr(self.upstream, "reachable", None) is True
            metadata = {"ok": reachable, "mock": False, "reachable": reachable}
        below = self.credentials.expiring_within(CREDENTIAL_FLOOR)
        credentials = {"ok": below == 0, "cached": self.credentials.counts()["fetched"],
                       "closer_to_expiry_than_floor": below, "floor_seconds": int(CREDENTIAL_FLOOR)}
        parts = {"docker": docker, "sts": sts, "metadata": metadata, "credentials": credentials}
        failing = [name for name, part in parts.items() if not part["ok"]]
        return dict({"ready": not failing, "failing": failing, "containers_known": len(self.index)}, **parts)

    def readyz(self) -> Tuple[int, str, bytes]:
        state = self.readiness()
        return self._json(200 if state["ready"] else 503, state)

    def prometheus(self) -> Tuple[int, str, bytes]:
        return 200, PROMETHEUS_TEXT, self.metrics.render().encode()

    def containers(self) -> Tuple[int, str, bytes]:
        """The index and each container's decision and credentials (STS's error code if it refused):
        an AccessKeyId at most, never a secret or token."""
        listing = []
        for container in sorted(self.index.containers(), key=lambda c: c.name):
            decision = self.lifecycle.roles.explain(container)   # the roles in force, after any reload
            alias, spec, reason = (None if decision.alias == "-" else decision.alias), decision.spec, decision.reason
            creds, sts_error = self.credentials.peek(container.id, spec) if spec is not None else (None, None)
            listing.append({
                "id": container.id, "name": container.name, "image": container.image,
                "addresses": list(container.ips), "networks": sorted(container.networks),
                "alias": alias, "role_arn": spec.arn if spec else None,
                "session_name": spec.session_name if spec else None,
                "refused": None if spec else (reason or "no alias: no label and no defaultAlias"),
                "access_key_id": creds.access_key_id if creds else None,
                "expiration": iso8601(creds.expiration) if creds else None,
                "sts_error": sts_error,
            })
        return self._json(200, {"count": len(listing), "containers": listing})


class AdminRequestHandler(http.server.BaseHTTPRequestHandler):
    """One operator's request on the admin listener, answered by the server's AdminService."""

    server_version = "ec2metaproxy-admin"
    timeout = 5.0   # a client that sends nothing does not hold its thread

    def do_GET(self):
        status, content_type, body, headers = self.server.admin.answer(self.command, self.path)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):
        log.debug("admin: " + format, *args)


class AdminTCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The admin listener on a loopback address; a connection from anywhere else is dropped."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: Tuple[str, int], admin: AdminService):
        self.admin = admin
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, AdminRequestHandler)

    def verify_request(self, request, client_address) -> bool:
        return ipaddress.ip_address(normalize_ip(client_address[0])).is_loopback


class AdminUnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The admin listener on a unix socket, mode 0600 (root's, or the proxy user's), removed on close."""

    daemon_threads = True

    def __init__(self, path: str, admin: AdminService):
        self.admin = admin
        self.path = path
        self._bound = False   # the socket file is ours to remove only once bound
        super().__init__(path, AdminRequestHandler)

    def server_bind(self):
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise OSError(f"{self.path} exists and is not a socket")
            if self._answers():
                raise OSError(f"another process is listening on {self.path}")
            os.unlink(self.path)   # left by a proxy that did not stop cleanly
        umask = os.umask(0o177)   # created 0600: no moment when others may connect
        try:
            super().server_bind()
        finally:
            os.umask(umask)
        self._bound = True
        os.chmod(self.path, 0o600)

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(self.path)
            except OSError:
                return False
        return True

    def get_request(self):
        request, _ = super().get_request()
        return request, ("unix", 0)   # BaseHTTPRequestHandler expects an address it can index

    def server_close(self):
        super().server_close()
        if self._bound:
            self._bound = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def admin_server(listen, admin: AdminService):
    """The admin listener for adminListen: a unix socket path, or a loopback (host, port)."""
    if isinstance(listen, str):
        return AdminUnixServer(listen, admin)
    return AdminTCPServer(listen, admin)


#####################################################################
# main ##############################################################
# Owns the command line, logging, signals, and the wiring of the parts.

# A secret is a run of 32+ characters of one base64 alphabet mixing upper case, lower case and
# digits: standard base64 ("/" and "+": secret access keys, session tokens) or base64url ("-"
# and "_": IMDSv2 tokens). A path joins its segments with "/" and its words with "-", so it is
# never one long run of either: ".../security-credentials/S3Reader" is kept, and so are an ARN
# and a hex container id; a secret inside a path is still a run, and is blanked whole.
# Each regex's lookaheads stay inside the run (they only cross its characters), and its
# lookbehind makes a match start where a run starts: linear, no Python call per candidate.
def _secret_runs(alphabet: str):
    return re.compile(rf"(?<!{alphabet})(?={alphabet}*[A-Z])(?={alphabet}*[a-z])(?={alphabet}*[0-9]){alphabet}{{32,}}")


SECRET_RUNS = (_secret_runs("[A-Za-z0-9+/=]"), _secret_runs("[A-Za-z0-9_=-]"))


def redact(text: str) -> str:
    spans = sorted(match.span() for pattern in SECRET_RUNS for match in pattern.finditer(text))
    if not spans:
        return text
    merged = [list(spans[0])]
    for start, end in spans[1:]:   # runs of the two alphabets may overlap: blank their union
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    pieces, done = [], 0
    for start, end in merged:
        pieces += (text[done:start], "[redacted]")
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


# The fields of access and audit lines repeat (a container's path, its name, its role): each is
# redacted once and then looked up. Bounded in entries and in their size (a longer value is
# redacted each time): a caller sending a new path each time costs one redact() each, as
# without the cache, and holds at most 4,096 entries of 256 characters.
CACHED_FIELD = 256


def field_cache(redactor: Callable[[str], str]) -> Callable[[str], str]:
    cached = functools.lru_cache(maxsize=4096)(redactor)
    return lambda value: cached(value) if len(value) <= CACHED_FIELD else redactor(value)


redact_field = field_cache(redact)


def redacted_args(args: tuple) -> tuple:
    return tuple(redact_field(value) if type(value) is str else value for value in args)


class RedactingFormatter(logging.Formatter):
    """Blanks anything shaped like a secret key, session token or IMDSv2 token, whatever logged it."""

    _stamped = (None, "")   # (a second, its text): one attribute, so threads never see half an update

    def format(self, record):
        return redact(self.render(record))

    def render(self, record) -> str:
        """The line before redaction; JsonFormatter's is a JSON object."""
        return super().format(record)

    def formatTime(self, record, datefmt=None):
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        # The same as logging's default, with the strftime done once a second, not once a line.
        # EventLog calls this from many threads at once, outside the handler's lock.
        second = int(created)
        stamped = self._stamped
        if stamped[0] != second:
            stamped = self._stamped = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)))
        return f"{stamped[1]},{int(msecs):03d}"

    def event_line(self, created: float, msg: str, args: tuple, fields: Tuple[str, ...], event: str) -> str:
        """An access or audit line, exactly as format() writes its LogLine (EventLog's fast path)."""
        return self.format(LogLine(msg, args, fields, event, created))


class TextFormatter(RedactingFormatter):
    """logFormat "text": time, level and message, written out rather than looked up by name."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def render(self, record) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().render(record)   # a traceback: as the standard formatter writes it
        return f"{self.formatTime(record)} {record.levelname} {record.getMessage()}"

    def event_line(self, created: float, msg: str, args: tuple, fields: Tuple[str, ...], event: str) -> str:
        # Redacting each argument is redacting the line: every %s in ACCESS_TEXT and AUDIT_TEXT
        # stands between characters no secret holds (a space, a quote), so no run crosses one.
        return f"{self.stamp(created, msecs_of(created))} INFO {msg % redacted_args(args)}"


def msecs_of(created: float) -> float:
    return int((created - int(created)) * 1000) + 0.0


class LogLine(logging.LogRecord):
    """An access or audit line: a LogRecord made without the lookups each request would pay for
    (the calling file's name and module, the thread's and the process's names, left None),
    carrying the field names a JSON line gives its arguments."""

    def __init__(self, msg: str, args: tuple, fields: Tuple[str, ...], event: str,   # noqa: no super()
                 created: Optional[float] = None):
        now = time.time() if created is None else created
        self.__dict__ = {
            "name": log.name, "msg": msg, "args": args, "levelname": "INFO", "levelno": logging.INFO,
            "pathname": __file__, "filename": None, "module": None, "exc_info": None, "exc_text": None,
            "stack_info": None, "lineno": 0, "funcName": None, "created": now,
            "msecs": msecs_of(now), "relativeCreated": 0.0,
            "thread": threading.get_ident(), "threadName": None, "processName": None, "process": None,
            "taskName": None, "fields": fields, "event": event}


def json_safe(value: str) -> str:
    """A string for a JSON line: redacted, and blanked whole if its JSON form still holds a secret's
    shape (an escape such as \\u00e9 or \\t joins letters and digits to the run after it)."""
    value = redact(value)
    encoded = json.dumps(value)
    return value if redact(encoded) == encoded else "[redacted]"


json_field = field_cache(json_safe)   # access and audit fields repeat, as in redact_field


def json_args(args: tuple) -> tuple:
    return tuple(json_field(value) if type(value) is str else value for value in args)


class JsonFormatter(RedactingFormatter):
    """One JSON object a line: time, level, logger, message, and an access or audit line's fields.

    Redacted value by value (json_safe), not as a whole line: blanking a run that an escape
    began would leave a backslash before "[redacted]", and the line would not be JSON. Values
    sit between quotes, so no run crosses from one into another.
    """

    def format(self, record) -> str:
        fields = getattr(record, "fields", None)
        args = json_args(record.args) if fields else ()
        line = self.as_object(record.created, record.msecs, record.levelname, record.name,
                              json_safe(record.getMessage()), fields, args, getattr(record, "event", ""))
        if record.exc_info:
            line["exception"] = json_safe(self.formatException(record.exc_info))
        return json.dumps(line)

    @staticmethod
    def as_object(created, msecs, level, logger, message, fields, args, event) -> Dict[str, object]:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z",
                "level": level, "logger": logger, "message": message}
        if fields and args:
            line["event"] = event
            for name, value in zip(fields, args):
                line[name] = round(value, 1) if isinstance(value, float) else value
        return line

    def event_line(self, created: float, msg: str, args: tuple, fields: Tuple[str, ...], event: str) -> str:
        # The message is made of the safe values: its JSON form is theirs joined by the shape's
        # spaces and quotes, which no run crosses, so it needs no check of its own.
        args = json_args(args)
        return json.dumps(self.as_object(created, msecs_of(created), "INFO", log.name, msg % args, fields, args,
                                         event))


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands finished lines (text, redacted) to the writer thread; drops them rather than make a
    request wait. A log sink that stalls (a full pipe, a stuck journal) must not stall the proxy.
    """

    def __init__(self, capacity: int = 10000):
        # A SimpleQueue (no Condition per put and get), bounded here by its size.
        super().__init__(queue.SimpleQueue())
        self.capacity = capacity
        self.dropped = 0
        self.dropped_total = 0   # never reset: the metrics' count

    def prepare(self, record) -> str:
        # Formatted here, once: this is the root's only handler and the last to see the record.
        return self.format(record)

    def enqueue(self, line: str) -> None:
        """Queue one line; EventLog calls this without the handler's lock, so the drop count takes it."""
        if self.dropped or self.queue.qsize() >= self.capacity:
            with self.lock:
                waiting = self.queue.qsize()
                if waiting >= self.capacity:
                    self.dropped += 1
                    self.dropped_total += 1
                    return
                if self.dropped and waiting < self.capacity // 2:
                    note = logging.LogRecord(log.name, logging.WARNING, __file__, 0,
                                             "%d log lines were dropped: the log output was not keeping up",
                                             (self.dropped,), None)
                    self.queue.put(self.format(note))
                    self.dropped = 0
        self.queue.put(line)


class EventLog:
    """Writes the access and audit lines, at INFO.

    Given the log writer's handler (main() gives it), it formats a line with that handler's
    formatter and queues it: no LogRecord, no trip through the logging module, and each field
    redacted once through a cache. This is most of an access line's cost, paid on every request
    while other requests wait for the interpreter. Without one (tests, a program importing this
    file), it hands the logger a LogLine, so whatever handlers are configured see it.
    """

    def __init__(self, handler: Optional[DroppingQueueHandler] = None, clock: Callable[[], float] = time.time):
        self.handler = handler
        self.clock = clock

    def write(self, msg: str, args: tuple, fields: Tuple[str, ...], event: str) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        handler = self.handler
        if handler is None:
            log.handle(LogLine(msg, args, fields, event, self.clock()))
        else:
            handler.enqueue(handler.formatter.event_line(self.clock(), msg, args, fields, event))


class LogWriter:
    """The thread that writes queued log lines, gathering them for a moment into one write."""

    GATHER = 0.01   # seconds a line may wait for others to share its write

    def __init__(self, lines: "queue.SimpleQueue", stream):
        self._lines = lines
        self._stream = stream
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._lines.get()]
            if batch[0] is not None:
                time.sleep(self.GATHER)
            while batch[-1] is not None and len(batch) < 4096:
                try:
                    batch.append(self._lines.get_nowait())
                except queue.Empty:
                    break
            text = "".join(line + "\n" for line in batch if line is not None)
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                pass   # nowhere left to say it
            if batch[-1] is None:
                return

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued, then end (bounded: a stuck stream cannot hold the exit)."""
        self._lines.put(None)
        self._thread.join(timeout)


def log_formatter(log_format: str) -> RedactingFormatter:
    """The formatter for logFormat "text" (time level message) or "json"."""
    if log_format == "json":
        return JsonFormatter()
    return TextFormatter()


def set_log_options(verbose: bool, log_format: str) -> None:
    """Apply verbose and logFormat to the handler configure_logging installed (at start, and on a reload)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, DroppingQueueHandler):
            handler.setFormatter(log_formatter(log_format))
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def configure_logging(verbose: bool, stream=None,
                      log_format: str = "text") -> Tuple[DroppingQueueHandler, LogWriter]:
    """Log lines go, redacted, through a bounded queue to a writer thread; returns the queue's
    handler (for an EventLog) and that writer."""
    handler = DroppingQueueHandler()
    writer = LogWriter(handler.queue, stream or sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    set_log_options(verbose, log_format)
    # The SDK's debug output includes response bodies, credentials among them: never let it through.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler, writer


# Keys a running proxy cannot change (its sockets, its Docker and STS clients, its cache's shape):
# a reload that changes one keeps the running value and says so. Keys not in CONFIG_KEYS are skipped.
RESTART_ONLY_KEYS = ("listen", "adminListen", "dockerHost", "metadataURL", "mock", "stsRegion", "stsEndpoint",
                     "stsRate", "stsBurst", "sessionScope", "envRoles", "staticMappings")


class StartupError(Exception):
    """The proxy cannot start (port in use, Docker socket path not a socket)."""


MOCK_REGION = "us-east-1"   # what the mock metadata tree says when nothing names a region


class Proxy:
    """Wires config, Docker, roles, credentials and the server together, and runs them."""

    def __init__(self, config: Config, sts=None, limits: Limits = Limits(), wait_timeout: float = 0.8,
                 env_region: Optional[str] = None, clock: Callable[[], float] = time.time,
                 static_ttl: float = STATIC_TTL, upstream_recheck: float = 30.0,
                 events: Optional[EventLog] = None):
        self.config = config
        events = events if events is not None else EventLog()
        self.upstream_recheck = upstream_recheck   # with the admin listener: /readyz's metadata probe, seconds
        self.env_region = env_region
        self._check_docker_socket(config.docker_socket)
        self.roles = RoleResolver(config)
        self.metrics = ProxyMetrics({options.arn: name for name, options in config.alias_to_arn.items()})
        self.sts = sts if sts is not None else StsClient(
            config.sts_region, config.sts_endpoint, None if config.mock else config.metadata_url, clock=clock)
        self.credentials = CredentialCache(self.sts, pacer=StsPacer(config.sts_rate, config.sts_burst),
                                           clock=clock, shared=config.session_scope == "role",
                                           metrics=self.metrics)
        self.audit = Audit(events=events)
        self.lifecycle = ContainerLifecycle(self.roles, self.credentials, audit=self.audit)
        self.index = ContainerIndex(config.static_mappings)
        self.watcher = DockerWatcher(DockerClient(config.docker_socket), self.index, with_env=config.env_roles,
                                     on_change=self.lifecycle.changed, on_create=self.lifecycle.created,
                                     metrics=self.metrics)
        if config.mock:
            self.upstream = MockUpstream(MockMetadata(config.sts_region or env_region or MOCK_REGION))
        else:
            self.upstream = MetadataUpstream(config.metadata_url)
        forwarded = self.upstream if config.mock or not static_ttl else StaticCache(self.upstream, static_ttl)
        budget = None if config.mock else ForwardBudget(
            limits.forward_rate_per_caller, limits.forward_burst_per_caller, limits.forward_caller_wait,
            limits.forward_rate, limits.forward_burst, limits.forward_wait)
        self.service = MetadataService(self.watcher, self.roles, self.credentials, TokenIssuer(clock=clock),
                                       forwarded, wait_timeout=wait_timeout,
                                       require_tokens=config.require_tokens,
                                       wall_clock=clock, forward_rule=config.forward, audit=self.audit,
                                       forward_budget=budget)
        try:
            self.server = MetadataProxyServer(config.listen, self.service, limits, metrics=self.metrics,
                                              events=events)
        except OSError as exc:
            host, port = config.listen
            raise StartupError(f"cannot listen on {host or '*'}:{port}: {exc.strerror or exc}") from None
        self.admin = None
        self._admin_serving = False
        if config.admin_listen is not None:
            admin = AdminService(self.metrics, self.watcher, self.index, self.lifecycle, self.credentials,
                                 self.upstream, mock=config.mock)
            try:
                self.admin = admin_server(config.admin_listen, admin)
            except OSError as exc:
                self.server.server_close()
                raise StartupError(f"adminListen: cannot listen on {self._admin_text()}: "
                                   f"{exc.strerror or exc}") from None
        self._stop = threading.Event()
        self.stopped = threading.Event()
        self._reload_lock = threading.Lock()   # one reload at a time (two SIGHUPs in a row)

    @staticmethod
    def _check_docker_socket(path: str) -> None:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return   # not there yet: Docker may start later, and the proxy waits for it
        if not stat.S_ISSOCK(mode):
            raise StartupError(f"dockerHost: {path} exists but is not a unix socket")

    @property
    def address(self) -> Tuple[str, int]:
        return self.server.server_address[:2]

    @property
    def admin_address(self):
        """Where the admin listener is: (host, port), a unix socket path, or None when it is off."""
        if self.admin is None:
            return None
        address = self.admin.server_address
        return address if isinstance(address, str) else tuple(address[:2])

    def _admin_text(self) -> str:
        listen = self.admin_address or self.config.admin_listen
        if isinstance(listen, str):
            return "unix://" + listen
        return f"[{listen[0]}]:{listen[1]}" if ":" in listen[0] else f"{listen[0]}:{listen[1]}"

    def start(self) -> None:
        """Everything but the accept loop: STS and the container list first, so first requests are known."""
        self._prepare_sts()
        self.credentials.start()
        self.watcher.sync_once()
        self.watcher.start()
        threading.Thread(target=self._probe_upstream, name="imds-probe", daemon=True).start()
        threading.Thread(target=self._probe_credentials, name="aws-credentials-probe", daemon=True).start()
        if self.admin is not None:
            self._admin_serving = True
            threading.Thread(target=self.admin.serve_forever, kwargs={"poll_interval": 0.2}, name="admin",
                             daemon=True).start()
            log.info("admin listener on %s (/healthz, /readyz, /metrics, /containers)", self._admin_text())
        host, port = self.address
        log.info("ec2metaproxy %s listening on %s:%d (%d containers, %d aliases%s)", __version__,
                 f"[{host}]" if ":" in host else host, port, len(self.index), len(self.config.alias_to_arn),
                 ", mock metadata" if self.config.mock else "")

    def _prepare_sts(self) -> None:
        """Choose the STS region and build the client now, so the first request does not pay for it.

        With no stsRegion, stsEndpoint or region in the environment, the instance's own
        region comes from the metadata service: a fleet never depends on us-east-1.
        """
        if not isinstance(self.sts, StsClient):
            return
        config = self.config
        if config.sts_region or config.sts_endpoint or self.env_region:
            self.sts.use_region(config.sts_region or self.env_region)
        elif config.mock:
            log.info("mock mode: the STS region comes from boto3's own configuration")
        else:
            region = self.upstream.region()
            if region:
                self.sts.use_region(region)
            else:
                log.warning("the instance's region is unknown (the metadata service did not say); "
                            "the STS region comes from boto3's own configuration")
        try:
            log.info("STS endpoint: %s", self.sts.endpoint())
        except CredentialError as exc:
            log.warning("cannot build the STS client yet: %s", exc)

    def _probe_upstream(self) -> None:
        if self.config.mock:
            log.warning("mock mode: metadata is answered from a built-in tree and %s is not used; "
                        "for a developer's machine, never for EC2", self.config.metadata_url)
            return
        backoff = Backoff(self._stop, base=1.0, cap=30.0)
        while not self.upstream.probe():
            if not backoff.wait():
                return
        # With the admin listener, /readyz says whether the service still answers: one
        # instance-id read every upstream_recheck seconds, far below the host's packet limit.
        while self.admin is not None and not self._stop.wait(self.upstream_recheck):
            self.upstream.probe()

    def _probe_credentials(self) -> None:
        """Say once whether the proxy has AWS credentials of its own to call STS with."""
        if not hasattr(self.sts, "credential_source"):
            return
        backoff = Backoff(self._stop, base=2.0, cap=60.0)
        while not self._stop.is_set():
            source = self.sts.credential_source()
            if source:
                log.info("the proxy's own AWS credentials come from %s", source)
                return
            if backoff.failures == 0:
                log.warning("the proxy has no AWS credentials of its own yet; containers get 503 "
                            "for credentials until it has; retrying")
            if not backoff.wait():
                return

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.2)

    def reload_from(self, path: str, then: Optional[Callable[[Config], None]] = None) -> Config:
        """Reload the config file (SIGHUP); on any error the running config stays. Returns the one in force."""
        try:
            config = load_config(path)
        except ConfigError as exc:
            log.error("config reload failed, keeping the running config: %s: %s", path, exc)
            return self.config
        return self.reload(config, then)

    def reload(self, new: Config, then: Optional[Callable[[Config], None]] = None) -> Config:
        """Put a validated config in force without a restart; returns the config now in force.

        then(config) runs once it is in force, before the line saying so (main's logging options).

        Keys in RESTART_ONLY_KEYS keep their running value (one line each says so). Every known
        container is decided again under the new config; one whose RoleSpec changed gets the new
        role's credentials prefetched and the old ones dropped; the others keep their cache.
        """
        with self._reload_lock:
            old = self.config
            kept = {}
            for key in RESTART_ONLY_KEYS:
                field = CONFIG_KEYS[key][0] if key in CONFIG_KEYS else None
                if field is not None and getattr(new, field) != getattr(old, field):
                    log.warning("config reload: %s cannot change without a restart; it stays as it was", key)
                    kept[field] = getattr(old, field)
            new = dataclasses.replace(new, **kept)
            roles = RoleResolver(new)
            # One assignment puts every request-time setting in force (ServiceSettings); requests
            # first, so none asks for the old roles' credentials once they are dropped.
            self.service.settings = ServiceSettings(roles, new.require_tokens, new.forward)
            self.metrics.set_aliases({options.arn: name for name, options in new.alias_to_arn.items()})
            decided = self.index.containers(static=True)
            changes = self.lifecycle.reconfigure(roles, decided)
            self.roles, self.config = roles, new
            if then is not None:
                then(new)
            log.info("config reloaded: %d aliases; %d of %d containers changed role%s", len(new.alias_to_arn),
                     len(changes), len(decided), "".join(
                         f"; {c.name}: {b.arn if b else 'none'} -> {a.arn if a else 'none'}"
                         for c, b, a in changes[:10]))
            return new

    def shutdown(self, timeout: float = 4.0) -> None:
        """Stop accepting, let requests in flight finish (bounded), stop the background threads."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.server.shutdown()
        drained = self.server.drain(timeout)
        self.server.server_close()
        if self.admin is not None:
            if self._admin_serving:
                self.admin.shutdown()
            self.admin.server_close()
        self.watcher.stop()
        self.credentials.stop()
        log.info("stopped%s", "" if drained else " (some connections were cut off)")
        self.stopped.set()


def find_container(index: ContainerIndex, target: str) -> Optional[Container]:
    """A container by address (a staticMappings one too), full or short id, or name."""
    try:
        address = normalize_ip(str(ipaddress.ip_address(target)))
    except ValueError:
        address = None
    if address is not None:
        return index.lookup(address) or index.static(address)
    for container in index.containers():
        if target in (container.name, container.id) or (len(target) >= 4 and container.id.startswith(target)):
            return container
    return None


def explain(config: Config, target: str, out) -> int:
    """--explain: print the decision for one container from Docker's listing, without calling STS.

    Returns 0 when it gets a role, 1 when it gets none or is not found, 2 when Docker cannot be asked.
    """
    index = ContainerIndex(config.static_mappings)
    began = time.monotonic()
    try:
        listing = list_containers(DockerClient(config.docker_socket), (lambda _: None) if config.env_roles else None)
    except DockerError as exc:
        print(f"ec2metaproxy: cannot list containers: {exc}", file=out)
        return 2
    index.install(listing, began)
    container = find_container(index, target)
    if container is None:
        print(f"{target}: no running container has this address, id or name", file=out)
        return 1
    decision = RoleResolver(config).explain(container)
    spec = decision.spec
    rows = [("container", f"{container.name} ({container.short_id})"), ("image", container.image or "-"),
            ("addresses", " ".join(container.ips) or "-"), ("rule", decision.rule), ("alias", decision.alias),
            ("role ARN", decision.arn)]
    if spec is None:
        rows.append(("credentials", f"none: {decision.reason}"))
    else:
        rows += [("session name", spec.session_name),
                 ("duration", f"{spec.duration}s"), ("external id", "set" if spec.external_id else "-"),
                 ("policy", spec.policy or "-"), ("policy ARNs", " ".join(spec.policy_arns) or "-"),
                 ("tags", " ".join(f"{key}={value}" for key, value in spec.tags) or "-"),
                 ("source identity", spec.source_identity or "-")]
    for name, value in rows:
        print(f"{name + ':':<17}{value}", file=out)
    return 0 if spec is not None else 1


VALIDATION_SESSION = "ec2metaproxy-validate-roles"


def alias_spec(config: Config, options: AliasOptions) -> RoleSpec:
    """The AssumeRole an alias makes, with its options, for a container known by no name."""
    stand_in = Container(id="validate-roles", name=VALIDATION_SESSION, image="", labels={}, networks={})
    tags = dict(config.session_tags)
    tags.update(options.session_tags)
    return RoleSpec(arn=options.arn, session_name=VALIDATION_SESSION,
                    policy=options.policy if options.policy is not None else config.default_policy,
                    external_id=options.external_id, policy_arns=options.policy_arns,
                    tags=tuple(sorted((key, TAG_VALUE_CHARS.sub("-", render_template(value, stand_in))[:256])
                                      for key, value in tags.items())),
                    duration=options.session_duration or config.session_duration)


def validation_sts(config: Config, env_region: Optional[str]) -> StsClient:
    """The STS client the proxy would call: the config's region, the environment's, else the instance's."""
    sts = StsClient(config.sts_region, config.sts_endpoint, None if config.mock else config.metadata_url)
    region = env_region
    if not (config.sts_region or config.sts_endpoint or region or config.mock):
        region = MetadataUpstream(config.metadata_url).region()
    if region:
        sts.use_region(region)
    return sts


def validate_roles(config: Config, sts, out) -> int:
    """--validate-roles: one AssumeRole per alias with its options; 0 when every alias works, else 1."""
    failed = 0
    width = max(len(alias) for alias in config.alias_to_arn)
    for alias, options in config.alias_to_arn.items():
        try:
            sts.assume_role(alias_spec(config, options), shorten=False)
            result = "OK"
        except CredentialError as exc:
            failed += 1
            result = f"{exc.code}: {exc.message}"
        print(f"{alias:<{width}}  {options.arn}  {redact(result)}", file=out)
    return 1 if failed else 0


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="ec2metaproxy",
        description="EC2 instance metadata proxy giving each Docker container its own IAM role.")
    parser.add_argument("-c", "--config", required=True, metavar="PATH", help="JSON config file")
    parser.add_argument("--check", action="store_true", help="validate the config file and exit")
    parser.add_argument("--explain", metavar="ADDRESS_OR_CONTAINER",
                        help="print the role decision for one container (no STS call) and exit")
    parser.add_argument("--validate-roles", action="store_true",
                        help="assume each alias's role once with its options, print OK or STS's error, and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ec2metaproxy: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"ec2metaproxy: {args.config}: OK")
        return 0
    if args.explain is not None:
        return explain(config, args.explain, sys.stdout)
    env_region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if args.validate_roles:
        try:
            sts = validation_sts(config, env_region)
        except ImportError as exc:
            print(f"ec2metaproxy: {exc.name} is required: python3 -m pip install boto3", file=sys.stderr)
            return 1
        return validate_roles(config, sts, sys.stdout)
    if config.mock:
        # Outside EC2: the proxy's own credentials are the developer's; botocore reads
        # this switch from the environment only.
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    handler, writer = configure_logging(config.verbose, log_format=config.log_format)
    try:
        proxy = Proxy(config, env_region=env_region, events=EventLog(handler))
    except StartupError as exc:
        writer.stop()
        print(f"ec2metaproxy: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        writer.stop()
        print(f"ec2metaproxy: {exc.name} is required: python3 -m pip install boto3", file=sys.stderr)
        return 1

    def stop(signum, frame):
        log.info("received %s; shutting down", signal.Signals(signum).name)
        threading.Thread(target=proxy.shutdown, name="shutdown", daemon=True).start()

    def reload():
        try:
            proxy.reload_from(args.config, then=lambda new: set_log_options(new.verbose, new.log_format))
        except Exception:   # a bug must cost the reload, said in the log, not a traceback on stderr
            log.exception("config reload failed unexpectedly; the running config may be partly replaced")

    def hangup(signum, frame):
        log.info("received SIGHUP; reloading %s", args.config)
        threading.Thread(target=reload, name="reload", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)
    proxy.start()
    proxy.serve_forever()
    proxy.stopped.wait(10)
    writer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
