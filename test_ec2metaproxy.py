"""Tests for ec2metaproxy, in the order of its sections.

Real parts, no mocks of the parts under test: a Docker Engine stand-in on a
real unix socket, STS from moto's server behind a recording front that can be
told to fail, a stand-in host IMDS whose credentials carry a marker, and real
HTTP clients (botocore's own credential chain among them) bound to 127.0.0.x
so that each address is a container. Traffic goes to loopback only; every wait
is bounded; every process and thread started here is stopped here.

Run: python3 -m unittest -v test_ec2metaproxy
"""

import collections
import contextlib
import http.client
import http.server
import io
import json
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import urllib.request

import ec2metaproxy as emp

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY = os.path.join(HERE, "ec2metaproxy.py")
ACCOUNT = "123456789012"
HOST_MARKER = "HOSTSECRETMARKER"


def arn(name: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/{name}"


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Poll predicate until it is truthy or timeout passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#####################################################################
# Stand-ins #########################################################

class LoopbackServer(http.server.ThreadingHTTPServer):
    """A stand-in's HTTP server: daemon threads, and a backlog that bursts of clients do not overflow."""

    daemon_threads = True
    request_queue_size = 128


class DockerStandIn:
    """A Docker Engine API stand-in on a real unix socket: list, inspect, a chunked /events stream."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.containers = collections.OrderedDict()
        self.calls = collections.Counter()
        self.list_delay = 0.0
        self.lock = threading.Lock()
        self._subscribers = []
        self._server = None
        self._thread = None
        self._running = threading.Event()

    # Containers

    def add_container(self, name, ips=(), labels=None, env=None, image="busybox:latest", networks=None,
                      network_mode="default", emit=True, container_id=None):
        """Add a running container; ips go on network 'bridge' unless networks={name: [ips]}."""
        container_id = container_id or secrets.token_hex(32)
        nets = {}
        for net_name, addresses in (networks or {"bridge": list(ips)}).items():
            v4 = [a for a in addresses if ":" not in a]
            v6 = [a for a in addresses if ":" in a]
            nets[net_name] = {"IPAddress": v4[0] if v4 else "", "GlobalIPv6Address": v6[0] if v6 else ""}
        if network_mode == "host":
            nets = {"host": {"IPAddress": "", "GlobalIPv6Address": ""}}
        summary = {
            "Id": container_id, "Names": ["/" + name], "Image": image, "ImageID": "sha256:" + "0" * 64,
            "Labels": dict(labels or {}), "State": "running",
            "HostConfig": {"NetworkMode": network_mode}, "NetworkSettings": {"Networks": nets},
        }
        with self.lock:
            self.containers[container_id] = {"summary": summary, "env": list(env or [])}
        if emit:
            self.emit({"Type": "container", "Action": "start", "Actor": {"ID": container_id, "Attributes": {
                "name": name, "image": image}}, "id": container_id, "status": "start"})
        return container_id

    def remove_container(self, container_id, emit=True):
        with self.lock:
            self.containers.pop(container_id, None)
        if emit:
            for action in ("die", "destroy"):
                self.emit({"Type": "container", "Action": action, "Actor": {"ID": container_id},
                           "id": container_id, "status": action})

    def disconnect(self, container_id, network, emit=True):
        with self.lock:
            self.containers[container_id]["summary"]["NetworkSettings"]["Networks"].pop(network, None)
        if emit:
            self.emit({"Type": "network", "Action": "disconnect",
                       "Actor": {"ID": "net", "Attributes": {"container": container_id, "name": network}}})

    def emit(self, event):
        line = (json.dumps(event) + "\n").encode()
        with self.lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.put(line)

    # Serving

    def start(self):
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = re.sub(r"^/v\d+\.\d+", "", urllib.parse.urlsplit(self.path).path)
                if path == "/events":
                    return self.events()
                if path == "/_ping":
                    return self.reply(200, b"OK", "text/plain")
                if path == "/version":
                    return self.reply(200, json.dumps({"ApiVersion": "1.43", "Version": "24.0.0"}).encode())
                if path == "/containers/json":
                    stand_in.calls["list"] += 1
                    if stand_in.list_delay:
                        time.sleep(stand_in.list_delay)
                    with stand_in.lock:
                        body = [c["summary"] for c in stand_in.containers.values()]
                    return self.reply(200, json.dumps(body).encode())
                match = re.match(r"^/containers/([^/]+)/json$", path)
                if match:
                    stand_in.calls["inspect"] += 1
                    with stand_in.lock:
                        found = [c for cid, c in stand_in.containers.items()
                                 if cid == match.group(1) or cid.startswith(match.group(1))
                                 or c["summary"]["Names"][0] == "/" + match.group(1)]
                    if not found:
                        return self.reply(404, b'{"message": "No such container"}')
                    summary = found[0]["summary"]
                    inspect = {"Id": summary["Id"], "Name": summary["Names"][0], "Image": summary["ImageID"],
                               "Config": {"Env": found[0]["env"], "Labels": summary["Labels"],
                                          "Image": summary["Image"], "Hostname": summary["Id"][:12]},
                               "HostConfig": summary["HostConfig"], "State": {"Running": True},
                               "NetworkSettings": dict(summary["NetworkSettings"], IPAddress=next(
                                   (n["IPAddress"] for n in summary["NetworkSettings"]["Networks"].values()),
                                   ""))}
                    return self.reply(200, json.dumps(inspect).encode())
                return self.reply(404, b'{"message": "page not found"}')

            def reply(self, status, body, content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def events(self):
                stand_in.calls["events"] += 1
                subscriber = queue.Queue()
                with stand_in.lock:
                    stand_in._subscribers.append(subscriber)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.flush()
                    while stand_in._running.is_set():
                        try:
                            line = subscriber.get(timeout=0.1)
                        except queue.Empty:
                            continue
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                except OSError:
                    pass
                finally:
                    with stand_in.lock:
                        stand_in._subscribers.remove(subscriber)
                    self.close_connection = True

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

            def get_request(self):
                request, _ = super().get_request()
                return request, ("docker-client", 0)

        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = Server(self.socket_path, Handler)
        self._running.set()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving, end every event stream and remove the socket (a daemon that went away)."""
        self._running.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


class StsStandIn:
    """moto's STS server in a subprocess, behind a recording front that can fail, throttle or stall."""

    def __init__(self):
        self.calls = collections.Counter()
        self.requests = []        # decoded form bodies of the calls that reached the front
        self.mode = "ok"          # ok | error | throttle | stall | down
        self.stall = 3.0
        self.deny = set()         # role ARNs answered with AccessDenied
        self.lock = threading.Lock()
        self._moto = None
        self._front = None

    def start(self):
        moto_port = free_port()
        self._moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.moto_url = f"http://127.0.0.1:{moto_port}"
        up = wait_until(lambda: self._probe(moto_port), timeout=30, interval=0.1)
        if not up:
            self.stop()
            raise RuntimeError("moto's server did not start")
        stand_in = self

        class Front(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                form = dict(urllib.parse.parse_qsl(body.decode()))
                action = form.get("Action", "?")
                with stand_in.lock:
                    stand_in.calls[action] += 1
                    stand_in.requests.append(form)
                mode = stand_in.mode
                if mode == "down":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode == "stall":
                    time.sleep(stand_in.stall)
                if mode == "error":
                    return self.error(500, "InternalFailure", "stand-in failure")
                if mode == "throttle":
                    return self.error(400, "Throttling", "Rate exceeded")
                if form.get("RoleArn") in stand_in.deny:
                    return self.error(403, "AccessDenied", "not authorized to perform sts:AssumeRole")
                conn = http.client.HTTPConnection("127.0.0.1", moto_port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request("POST", self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.getheader("Content-Type", "text/xml"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def error(self, status, code, message):
                data = (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
                        f"<Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
                        f"<RequestId>stand-in</RequestId></ErrorResponse>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._front = LoopbackServer(("127.0.0.1", 0), Front)
        self.url = f"http://127.0.0.1:{self._front.server_address[1]}"
        threading.Thread(target=self._front.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @staticmethod
    def _probe(port):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    def reset(self):
        with self.lock:
            self.calls.clear()
            self.requests.clear()
        self.mode = "ok"
        self.deny = set()

    def assume_calls(self):
        with self.lock:
            return self.calls["AssumeRole"]

    def stop(self):
        if self._front is not None:
            self._front.shutdown()
            self._front.server_close()
        if self._moto is not None:
            self._moto.terminate()
            try:
                self._moto.wait(10)
            except subprocess.TimeoutExpired:
                self._moto.kill()
                self._moto.wait(5)


class ImdsStandIn:
    """The host's metadata service on loopback; its credentials carry HOST_MARKER."""

    def __init__(self):
        self.requests = []   # (method, raw path, headers)
        self.connections = 0
        self.delay = 0.0
        self.require_token = False
        self.lock = threading.Lock()
        self.token = "host-imds-token-" + secrets.token_hex(8)
        self._server = None

    def start(self, port=0):
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with stand_in.lock:
                    stand_in.connections += 1

            def record(self):
                with stand_in.lock:
                    stand_in.requests.append((self.command, self.path, dict(self.headers)))
                if stand_in.delay:
                    time.sleep(stand_in.delay)

            def do_PUT(self):
                self.record()
                if self.path == "/latest/api/token":
                    return self.reply(200, stand_in.token, ttl=self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"))
                self.reply(403, "forbidden")

            def do_GET(self):
                self.record()
                if stand_in.require_token and self.headers.get("X-aws-ec2-metadata-token") != stand_in.token:
                    return self.reply(401, "unauthorized")
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                creds = json.dumps({"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIA" + HOST_MARKER,
                                    "SecretAccessKey": HOST_MARKER + "secret", "Token": HOST_MARKER + "token",
                                    "Expiration": "2099-01-01T00:00:00Z", "LastUpdated": "2026-01-01T00:00:00Z"})
                answers = {
                    "/latest/meta-data/instance-id": "i-0host0000000000",
                    "/latest/meta-data/local-ipv4": "10.0.0.10",
                    "/latest/meta-data/iam/security-credentials/": "host-role",
                    "/latest/meta-data/iam/security-credentials/host-role": creds,
                    "/latest/meta-data/iam/info": json.dumps({"InstanceProfileArn": HOST_MARKER}),
                    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance": creds,
                    "/latest/user-data": "#!/bin/sh\necho hello",
                }
                lowered = {key.lower(): value for key, value in answers.items()}
                if path in answers or path.lower() in lowered:
                    return self.reply(200, answers.get(path) or lowered[path.lower()])
                if path == "/latest/meta-data":
                    return self.reply(301, "", location="http://169.254.169.254/latest/meta-data/")
                self.reply(404, "not found")

            def do_HEAD(self):
                self.do_GET()

            def reply(self, status, text, ttl=None, location=None):
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                if ttl:
                    self.send_header("X-aws-ec2-metadata-token-ttl-seconds", ttl)
                if location:
                    self.send_header("Location", location)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self._server = LoopbackServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def paths(self):
        with self.lock:
            return [urllib.parse.unquote(urllib.parse.urlsplit(path).path) for _, path, _ in self.requests]

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


STS = None


def setUpModule():
    global STS
    # The proxy's own credentials (the host's, for AssumeRole) come from the environment here,
    # so its credential chain never looks for a real metadata service.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
                      AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    STS = StsStandIn().start()


def tearDownModule():
    if STS is not None:
        STS.stop()


def base_config(**overrides):
    data = {
        "listen": "127.0.0.1:0",
        "aliasToARN": {"default": arn("default-role"), "web": arn("web-role"), "db": arn("db-role")},
        "defaultAlias": "default",
        "stsEndpoint": STS.url if STS else "http://127.0.0.1:9",
        "stsRegion": "us-east-1",
        "verbose": True,
    }
    data.update(overrides)
    return data


class ProxyFixture:
    """A whole proxy in this process on 127.0.0.1, with its own Docker and IMDS stand-ins."""

    def __init__(self, limits=emp.Limits(), wait_timeout=0.8, **config):
        self.tmp = tempfile.mkdtemp(prefix="emp-test-")
        self.docker = DockerStandIn(os.path.join(self.tmp, "docker.sock")).start()
        self.imds = ImdsStandIn().start()
        data = base_config(dockerHost="unix://" + self.docker.socket_path, metadataURL=self.imds.url)
        data.update(config)
        self.config = emp.parse_config(data)
        self.limits = limits
        self.wait_timeout = wait_timeout
        self.proxy = None

    def start(self):
        self.proxy = emp.Proxy(self.config, limits=self.limits, wait_timeout=self.wait_timeout)
        self.proxy.start()
        self.thread = threading.Thread(target=self.proxy.serve_forever, daemon=True)
        self.thread.start()
        self.port = self.proxy.address[1]
        return self

    def stop(self):
        if self.proxy is not None:
            self.proxy.shutdown(timeout=2)
            self.thread.join(5)
        self.docker.stop()
        self.imds.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def request(self, path, source="127.0.0.1", method="GET", headers=None, body=None, timeout=5):
        """One request on a new connection from source; returns (status, headers dict, body text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout, source_address=(source, 0))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data.decode("latin-1")
        finally:
            conn.close()

    def raw(self, data: bytes, source="127.0.0.1", timeout=5.0) -> bytes:
        """Send raw bytes, return everything the proxy answers until it closes (or timeout)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout,
                                      source_address=(source, 0)) as sock:
            sock.sendall(data)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            chunks = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    break
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    def credentials(self, source, role, version="latest"):
        status, _, body = self.request(f"/{version}/meta-data/iam/security-credentials/{role}", source)
        return status, (json.loads(body) if status == 200 else body)


class LogCapture:
    """Captures the proxy's log lines (through its own redacting formatter) for assertions."""

    def __enter__(self):
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(emp.RedactingFormatter("%(levelname)s %(message)s"))
        emp.log.addHandler(self.handler)
        self.level = emp.log.level
        emp.log.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        emp.log.removeHandler(self.handler)
        emp.log.setLevel(self.level)

    @property
    def text(self):
        return self.stream.getvalue()


class ProxyTestCase(unittest.TestCase):
    """Starts a ProxyFixture per test; subclasses set `config` or override make_fixture."""

    config = {}

    def make_fixture(self):
        return ProxyFixture(**self.config)

    def setUp(self):
        STS.reset()
        self.fx = self.make_fixture()
        self.addCleanup(self.fx.stop)
        self.docker = self.fx.docker
        self.imds = self.fx.imds

    def start(self):
        return self.fx.start()

    def assertNoHostSecrets(self, *texts):
        for text in texts:
            self.assertNotIn(HOST_MARKER, str(text))


#####################################################################
# Config ############################################################

FORK_CONFIG = {
    "defaultAlias": "default",
    "aliasToARN": {
        "default": "arn:aws:iam::000000000000:role/ProxyDefault",
        "db": "arn:aws:iam::000000000000:role/MysqlSlave",
    },
    "dockerHost": "unix:///var/run/custom-docker.sock",
    "listen": ":18000",
    "verbose": True,
}


class TestConfig(unittest.TestCase):

    def write(self, text):
        handle = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        handle.write(text)
        handle.close()
        self.addCleanup(os.unlink, handle.name)
        return handle.name

    def error(self, data):
        with self.assertRaises(emp.ConfigError) as caught:
            emp.parse_config(data)
        return str(caught.exception)

    def test_fork_config_works_unchanged(self):
        config = emp.parse_config(FORK_CONFIG)
        self.assertEqual(config.listen, ("", 18000))
        self.assertEqual(config.docker_socket, "/var/run/custom-docker.sock")
        self.assertEqual(config.alias_to_arn["db"].arn, "arn:aws:iam::000000000000:role/MysqlSlave")
        self.assertTrue(config.verbose)

    def test_defaults(self):
        config = emp.parse_config({"listen": ":18000", "aliasToARN": {"a": arn("a")}, "defaultAlias": None})
        self.assertIsNone(config.default_alias)
        self.assertEqual(config.alias_label, "ec2metaproxy.RoleAlias")
        self.assertEqual(config.policy_label, "ec2metaproxy.Policy")
        self.assertEqual(config.docker_socket, "/var/run/docker.sock")
        self.assertEqual(config.metadata_url, "http://169.254.169.254")
        self.assertEqual(config.session_duration, 3600)
        self.assertIsNone(config.sts_region)
        self.assertIsNone(config.sts_endpoint)
        self.assertFalse(config.verbose)

    def test_example_config_is_valid(self):
        config = emp.load_config(os.path.join(HERE, "config.example.json"))
        self.assertIn(config.default_alias, config.alias_to_arn)

    def test_listen_forms(self):
        for text, expected in ((":18000", ("", 18000)), ("127.0.0.1:18000", ("127.0.0.1", 18000)),
                               ("[::]:18000", ("::", 18000)), ("[::1]:80", ("::1", 80)),
                               ("localhost:0", ("localhost", 0))):
            self.assertEqual(emp.parse_listen("listen", text), expected)
        for text in ("18000", "127.0.0.1", ":", ":99999", "::1:80", "[zz]:80", "a b:80", ":-1", 18000):
            with self.assertRaises(emp.ConfigError, msg=text) as caught:
                emp.parse_listen("listen", text)
            self.assertTrue(str(caught.exception).startswith("listen:"))

    def test_partitions(self):
        for partition in ("aws", "aws-cn", "aws-us-gov"):
            value = f"arn:{partition}:iam::{ACCOUNT}:role/path/to/name"
            self.assertEqual(emp.parse_role_arn("k", value), value)

    def test_each_error_names_its_key(self):
        good = base_config()
        cases = [
            ({k: v for k, v in good.items() if k != "listen"}, "listen: required key is missing"),
            ({k: v for k, v in good.items() if k != "aliasToARN"}, "aliasToARN: required key is missing"),
            ({k: v for k, v in good.items() if k != "defaultAlias"}, "defaultAlias: required key is missing"),
            (dict(good, lisen=":1"), "lisen: unknown key (did you mean 'listen'?)"),
            (dict(good, aliasToARN={}), "aliasToARN: must name at least one alias"),
            (dict(good, defaultAlias="nope"), "defaultAlias: 'nope' is not an alias in aliasToARN"),
            (dict(good, aliasToARN={"default": "arn:aws:iam::123:role/x"}), "aliasToARN.default: "),
            (dict(good, aliasToARN={"default": "arn:aws:iam::123456789012:user/x"}), "aliasToARN.default: "),
            (dict(good, listen="nope"), "listen: "),
            (dict(good, sessionDuration=600), "sessionDuration: 600 is outside 900..43200"),
            (dict(good, sessionDuration="3600"), "sessionDuration: expected"),
            (dict(good, verbose="yes"), "verbose: expected true or false"),
            (dict(good, dockerHost="tcp://1.2.3.4:2375"), "dockerHost: "),
            (dict(good, metadataURL="https://x"), "metadataURL: "),
            (dict(good, defaultPolicy="{not json"), "defaultPolicy: not valid JSON"),
            (dict(good, defaultPolicy=[1]), "defaultPolicy: expected a policy document"),
            (dict(good, aliasLabel=5), "aliasLabel: expected a label name"),
            ([], "the top level must be a JSON object"),
        ]
        for data, expected in cases:
            message = self.error(data)
            self.assertTrue(message.startswith(expected), f"{message!r} should start with {expected!r}")
            self.assertNotIn("\n", message)

    def run_proxy(self, *args, timeout=20):
        return subprocess.run([sys.executable, PROXY, *args], capture_output=True, text=True, timeout=timeout)

    def test_bad_config_exits_with_one_line_and_no_traceback(self):
        cases = {
            '{"listen": ":1",\n "aliasToARN": {}, }': "invalid JSON at line 2 column",
            json.dumps(dict(FORK_CONFIG, lisen=":2")): "lisen: unknown key",
            json.dumps({k: v for k, v in FORK_CONFIG.items() if k != "defaultAlias"}): "defaultAlias: required",
            json.dumps(dict(FORK_CONFIG, listen="1.2.3.4")): "listen: ",
        }
        for text, expected in cases.items():
            result = self.run_proxy("-c", self.write(text))
            self.assertEqual(result.returncode, 2, result.stderr)
            lines = result.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, result.stderr)
            self.assertIn(expected, lines[0])
            self.assertNotIn("Traceback", result.stderr)
        result = self.run_proxy("-c", "/nonexistent/config.json")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip(),
                         "ec2metaproxy: /nonexistent/config.json: cannot read config file "
                         "/nonexistent/config.json: No such file or directory")

    def test_check_flag_validates_only(self):
        result = self.run_proxy("-c", self.write(json.dumps(FORK_CONFIG)), "--check")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("OK", result.stdout)


#####################################################################
# Docker ############################################################

class DockerTestCase(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="emp-docker-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.docker = DockerStandIn(os.path.join(self.tmp, "docker.sock")).start()
        self.addCleanup(self.docker.stop)
        self.added, self.removed = [], []
        self.index = emp.ContainerIndex(emp.DockerClient(self.docker.socket_path),
                                        on_added=self.added.extend, on_removed=self.removed.extend)
        self.addCleanup(self.index.stop)


class TestDockerClient(DockerTestCase):

    def test_list_inspect_and_events_over_the_unix_socket(self):
        client = emp.DockerClient(self.docker.socket_path)
        cid = self.docker.add_container("one", ["172.17.0.2"], env=["IAM_ROLE=x", "A=b=c"], emit=False)
        self.assertEqual([c["Id"] for c in client.list_containers()], [cid])
        self.assertEqual(emp.parse_env(client.inspect(cid)["Config"]["Env"]), {"IAM_ROLE": "x", "A": "b=c"})
        stream = client.events()
        self.docker.emit({"Type": "container", "Action": "start", "Actor": {"ID": "abc"}})
        self.assertEqual(next(stream)["Actor"]["ID"], "abc")
        stream.close()

    def test_unreachable_daemon_is_a_docker_error(self):
        client = emp.DockerClient(os.path.join(self.tmp, "missing.sock"))
        with self.assertRaises(emp.DockerError):
            client.list_containers()
        with self.assertRaises(emp.DockerError):
            client.inspect("nope")


class TestContainerIndex(DockerTestCase):

    def test_every_address_of_every_network_and_never_host_network(self):
        web = self.docker.add_container("web", networks={"bridge": ["172.17.0.2", "fd00::2"],
                                                          "backend": ["172.20.0.5"]}, emit=False)
        self.docker.add_container("hostnet", network_mode="host", emit=False)
        self.assertTrue(self.index.sync_once())
        for ip in ("172.17.0.2", "fd00::2", "172.20.0.5"):
            self.assertEqual(self.index.lookup(ip).id, web)
        self.assertEqual(len(self.index), 2)
        self.assertIsNone(self.index.lookup(""))
        self.assertEqual({c.name for c in self.added}, {"web", "hostnet"})

    def test_events_keep_the_index_current_and_die_drops_the_address_at_once(self):
        self.index.sync_once()
        self.index.start()
        self.assertTrue(wait_until(lambda: self.docker.calls["events"] >= 1))
        first = self.docker.add_container("first", ["172.17.0.3"])
        self.assertTrue(wait_until(lambda: self.index.lookup("172.17.0.3")))
        # The event stream is the only source: remove the container from the listing first,
        # so only the die event can take it out of the index.
        self.docker.list_delay = 0
        self.docker.remove_container(first)
        self.assertTrue(wait_until(lambda: self.index.lookup("172.17.0.3") is None))
        self.assertIn(first, self.removed)
        second = self.docker.add_container("second", ["172.17.0.3"])
        self.assertTrue(wait_until(lambda: getattr(self.index.lookup("172.17.0.3"), "id", None) == second))

    def test_a_burst_of_start_events_coalesces_into_few_listings(self):
        self.index.sync_once()
        self.index.start()
        self.assertTrue(wait_until(lambda: self.docker.calls["events"] >= 1))
        self.assertTrue(self.index.wait_synced(5))
        before = self.docker.calls["list"]
        for number in range(300):
            self.docker.add_container(f"c{number}", [f"172.18.{number // 250}.{number % 250 + 1}"])
        self.assertTrue(wait_until(lambda: len(self.index) == 300, timeout=10))
        self.assertLessEqual(self.docker.calls["list"] - before, 10)
        self.assertEqual(self.docker.calls["inspect"], 0)

    def test_unknown_callers_make_one_docker_call_between_them(self):
        self.index.sync_once()
        self.index.start()
        self.assertTrue(self.index.wait_synced(5))
        self.docker.list_delay = 0.1
        self.docker.add_container("late", ["172.17.0.9"], emit=False)
        before = self.docker.calls["list"]
        results = []
        threads = [threading.Thread(target=lambda ip=ip: results.append(self.index.lookup_or_resync(ip, 2)))
                   for ip in ["172.17.0.9"] + [f"10.9.9.{n}" for n in range(30)]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        self.assertLessEqual(self.docker.calls["list"] - before, 2)
        self.assertEqual(sum(1 for r in results if r is not None), 1)
        # Callers that stay unknown, asking as fast as they can for a second, get few listings.
        self.docker.list_delay = 0
        before = self.docker.calls["list"]
        deadline = time.monotonic() + 1.0
        asked = 0
        while time.monotonic() < deadline and asked < 5000:
            self.assertIsNone(self.index.lookup_or_resync(f"10.9.8.{asked % 200}", 0.01))
            asked += 1
        self.assertGreater(asked, 50)
        self.assertLessEqual(self.docker.calls["list"] - before, 6)

    def test_a_die_during_a_listing_is_not_undone_by_it(self):
        cid = self.docker.add_container("dying", ["172.17.0.4"], emit=False)
        self.index.sync_once()
        self.docker.list_delay = 0.5
        listing = threading.Thread(target=self.index.sync_once)
        listing.start()
        time.sleep(0.1)   # the listing has begun and still holds the container
        self.index.handle_event({"Type": "container", "Action": "die", "Actor": {"ID": cid}})
        listing.join(5)
        self.assertIsNone(self.index.lookup("172.17.0.4"))
        # A later listing that no longer shows it keeps it out, and one that shows it again
        # (a restart, with its start event) brings it back.
        self.docker.list_delay = 0
        self.index.handle_event({"Type": "container", "Action": "start", "Actor": {"ID": cid}})
        self.index.sync_once()
        self.assertEqual(self.index.lookup("172.17.0.4").id, cid)

    def test_disconnect_drops_that_network_only(self):
        cid = self.docker.add_container("multi", networks={"bridge": ["172.17.0.6"], "app": ["172.21.0.6"]},
                                        emit=False)
        self.index.sync_once()
        self.index.handle_event({"Type": "network", "Action": "disconnect",
                                 "Actor": {"Attributes": {"container": cid, "name": "app"}}})
        self.assertIsNone(self.index.lookup("172.21.0.6"))
        self.assertEqual(self.index.lookup("172.17.0.6").id, cid)

    def test_two_containers_claiming_one_address_get_neither(self):
        self.docker.add_container("a", ["172.17.0.7"], emit=False)
        self.docker.add_container("b", ["172.17.0.7"], emit=False)
        self.index.sync_once()
        self.assertIsNone(self.index.lookup("172.17.0.7"))

    def test_reconnects_and_resyncs_after_the_daemon_restarts(self):
        self.docker.add_container("before", ["172.17.0.10"], emit=False)
        self.index.sync_once()
        self.index.start()
        self.assertTrue(wait_until(lambda: self.docker.calls["events"] >= 1))
        self.docker.stop()
        self.assertTrue(wait_until(lambda: self.index.reachable is False, timeout=5))
        # Known containers are still served while Docker is away.
        self.assertEqual(self.index.lookup("172.17.0.10").name, "before")
        self.docker.add_container("while-down", ["172.17.0.11"], emit=False)
        started = time.monotonic()
        self.docker.start()
        self.assertTrue(wait_until(lambda: self.index.lookup("172.17.0.11"), timeout=15))
        self.assertTrue(wait_until(lambda: self.index.reachable, timeout=5))
        self.assertLess(time.monotonic() - started, 15)


#####################################################################
# Roles #############################################################

def container(name="app", labels=None, env=None, image="busybox:latest", networks=None, cid=None):
    return emp.Container(id=cid or secrets.token_hex(32), name=name, image=image, labels=labels or {},
                         networks=networks or {"bridge": ("172.17.0.2",)},
                         env=None if env is None else dict(env))


class TestRoleResolver(unittest.TestCase):

    def resolver(self, **overrides):
        return emp.RoleResolver(emp.parse_config(base_config(**overrides)))

    def test_label_alias_default_and_null_default(self):
        roles = self.resolver()
        self.assertEqual(roles.role_for(container(labels={"ec2metaproxy.RoleAlias": "web"})).arn, arn("web-role"))
        self.assertEqual(roles.role_for(container()).arn, arn("default-role"))
        self.assertIsNone(self.resolver(defaultAlias=None).role_for(container()))

    def test_an_unknown_alias_fails_closed_with_a_warning(self):
        with LogCapture() as logs:
            spec = self.resolver().role_for(container("typo-app", labels={"ec2metaproxy.RoleAlias": "wbe"}))
        self.assertIsNone(spec)
        self.assertIn("typo-app", logs.text)
        self.assertIn("'wbe'", logs.text)
        self.assertIn("WARNING", logs.text)

    def test_custom_labels_policy_label_and_default_policy(self):
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject",
                                                          "Resource": "*"}]}
        roles = self.resolver(aliasLabel="role", policyLabel="policy", defaultPolicy=policy)
        labelled = roles.role_for(container(labels={"role": "db", "policy": json.dumps({"Statement": []})}))
        self.assertEqual(labelled.arn, arn("db-role"))
        self.assertEqual(json.loads(labelled.policy), {"Statement": []})
        self.assertEqual(json.loads(roles.role_for(container()).policy), policy)
        self.assertIsNone(roles.role_for(container(labels={"role": "db", "policy": "{broken"})))

    def test_session_name_is_sanitised_and_bounded(self):
        roles = self.resolver()
        cases = {"web_1": "web_1", "my app/with:odd*chars": "my-app-with-odd-chars", "x" * 100: "x" * 64}
        for name, expected in cases.items():
            self.assertEqual(roles.role_for(container(name)).session_name, expected)
        short = roles.role_for(container("a", cid="abcdef0123456789" * 4)).session_name
        self.assertEqual(short, "a-ec2metaproxy-abcdef012345")
        for name in ("a", "", "é" * 70):
            self.assertRegex(roles.role_for(container(name)).session_name, r"^[\w+=,.@-]{2,64}$")

    def test_the_answer_is_remembered_per_container(self):
        roles = self.resolver()
        one = container(labels={"ec2metaproxy.RoleAlias": "web"})
        self.assertIs(roles.role_for(one), roles.role_for(one))
        roles.forget([one.id])
        self.assertEqual(roles.role_for(one).arn, arn("web-role"))


#####################################################################
# Credentials #######################################################

class FakeClock:
    """A settable wall clock for the credential cache."""

    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


class TestStsClient(unittest.TestCase):

    def setUp(self):
        STS.reset()
        self.sts = emp.StsClient("us-east-1", STS.url)

    def test_assume_role_against_moto(self):
        spec = emp.RoleSpec(arn("web-role"), "web-1", duration=3600, policy='{"Statement":[]}')
        creds = self.sts.assume_role(spec)
        self.assertTrue(creds.access_key_id)
        self.assertAlmostEqual(creds.expiration - time.time(), 3600, delta=120)
        body = json.loads(creds.body)
        self.assertEqual(body["Code"], "Success")
        self.assertEqual(body["Type"], "AWS-HMAC")
        self.assertRegex(body["Expiration"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertRegex(body["LastUpdated"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(json.loads(creds.extended_body)["AccountId"], ACCOUNT)
        sent = STS.requests[-1]
        self.assertEqual((sent["RoleArn"], sent["RoleSessionName"], sent["DurationSeconds"], sent["Policy"]),
                         (arn("web-role"), "web-1", "3600", '{"Statement":[]}'))
        self.assertNotIn(creds.secret_access_key, repr(creds))
        self.assertNotIn(creds.token, repr(creds))

    def test_errors_carry_stss_code(self):
        STS.deny = {arn("denied")}
        with self.assertRaises(emp.CredentialError) as caught:
            self.sts.assume_role(emp.RoleSpec(arn("denied"), "x-1"))
        self.assertEqual(caught.exception.code, "AccessDenied")
        self.assertFalse(caught.exception.retryable)
        STS.mode = "throttle"
        with self.assertRaises(emp.CredentialError) as caught:
            self.sts.assume_role(emp.RoleSpec(arn("web"), "x-1"))
        self.assertEqual(caught.exception.code, "Throttling")
        self.assertTrue(caught.exception.retryable)

    def test_each_call_is_bounded_in_time_and_attempts(self):
        STS.mode = "stall"
        STS.stall = 6
        sts = emp.StsClient("us-east-1", STS.url, read_timeout=1.0)
        started = time.monotonic()
        with self.assertRaises(emp.CredentialError):
            sts.assume_role(emp.RoleSpec(arn("web"), "x-1"))
        self.assertLess(time.monotonic() - started, 3.5)
        self.assertEqual(STS.assume_calls(), 1)

    def test_refresh_margin_keeps_thirty_minutes(self):
        for lifetime in (3600, 7200, 43200):
            self.assertGreaterEqual(emp.refresh_margin(lifetime), 1800 + 300)
        self.assertLess(emp.refresh_margin(900), 900)


class ShiftedSts:
    """The real StsClient against moto, its expiry moved onto a FakeClock's time line."""

    def __init__(self, clock):
        self.sts = emp.StsClient("us-east-1", STS.url)
        self.clock = clock

    def assume_role(self, spec):
        creds = self.sts.assume_role(spec)
        shift = self.clock() - time.time()
        return emp.Credentials.issue(creds.access_key_id, creds.secret_access_key, creds.token,
                                     creds.expiration + shift, creds.last_updated + shift, spec.account_id)


class TestCredentialCache(unittest.TestCase):

    def setUp(self):
        STS.reset()
        self.clock = FakeClock()
        self.cache = emp.CredentialCache(ShiftedSts(self.clock), clock=self.clock, background_rate=200)
        self.cache.start()
        self.addCleanup(self.cache.stop)
        self.spec = emp.RoleSpec(arn("web-role"), "web-1")

    def test_concurrent_requests_make_one_sts_call(self):
        results = []
        threads = [threading.Thread(target=lambda: results.append(self.cache.get("c1", "web-1", self.spec, 5)))
                   for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        self.assertEqual(len({creds.access_key_id for creds in results}), 1)
        self.assertEqual(len(results), 20)
        self.assertEqual(STS.assume_calls(), 1)

    def test_prefetch_then_no_sts_call_on_the_request_path(self):
        self.cache.prefetch("c1", "web-1", self.spec)
        self.assertTrue(wait_until(lambda: self.cache.cached("c1", self.spec)))
        calls = STS.assume_calls()
        for _ in range(50):
            self.cache.get("c1", "web-1", self.spec, 1)
        self.assertEqual(STS.assume_calls(), calls)

    def test_refreshed_in_the_background_before_thirty_minutes_are_left(self):
        first = self.cache.get("c1", "web-1", self.spec, 5)
        # Step the clock through the hour; every answer must have 30+ minutes left.
        seen = {first.access_key_id}
        for minute in range(0, 120, 5):
            self.clock.now = first.last_updated + minute * 60
            wait_until(lambda: self.cache.cached("c1", self.spec) is not None and
                       self.cache.cached("c1", self.spec).expiration - self.clock.now >= 1800, timeout=5)
            creds = self.cache.get("c1", "web-1", self.spec, 5)
            self.assertGreaterEqual(creds.expiration - self.clock.now, 1800, f"at minute {minute}")
            seen.add(creds.access_key_id)
        self.assertGreaterEqual(len(seen), 3)

    def test_failures_answer_fast_back_off_and_recover(self):
        STS.mode = "error"
        started = time.monotonic()
        with self.assertRaises(emp.CredentialError):
            self.cache.get("c1", "web-1", self.spec, 0.8)
        self.assertLess(time.monotonic() - started, 1.0)
        calls = STS.assume_calls()
        for _ in range(20):   # hammering during the backoff makes no more STS calls
            with self.assertRaises(emp.CredentialError):
                self.cache.get("c1", "web-1", self.spec, 0.05)
        self.assertLessEqual(STS.assume_calls() - calls, 1)
        STS.mode = "ok"
        self.clock.now += 10   # past the longest retryable backoff: the background retry runs
        self.assertTrue(wait_until(lambda: self.cache.cached("c1", self.spec), timeout=5))

    def test_keys_separate_containers_and_options_and_drop_removes(self):
        other = emp.RoleSpec(arn("web-role"), "web-1", external_id="ext-1")
        one = self.cache.get("c1", "web-1", self.spec, 5)
        self.assertNotEqual(one.access_key_id, self.cache.get("c2", "web-2", self.spec, 5).access_key_id)
        self.assertNotEqual(one.access_key_id, self.cache.get("c1", "web-1", other, 5).access_key_id)
        self.cache.drop_container("c1")
        self.assertIsNone(self.cache.cached("c1", self.spec))
        self.assertIsNone(self.cache.cached("c1", other))
        self.assertEqual(len(self.cache), 1)


#####################################################################
# IMDS protocol #####################################################

class TestTokenIssuer(unittest.TestCase):

    def test_bound_expiring_and_tamper_proof(self):
        clock = FakeClock()
        tokens = emp.TokenIssuer(clock=clock)
        token = tokens.issue("container-a", 60)
        self.assertTrue(tokens.valid(token, "container-a"))
        self.assertFalse(tokens.valid(token, "container-b"))
        self.assertFalse(tokens.valid(token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), "container-a"))
        self.assertFalse(tokens.valid("garbage", "container-a"))
        self.assertFalse(tokens.valid("!" * 54, "container-a"))
        self.assertFalse(emp.TokenIssuer(clock=clock).valid(token, "container-a"))   # another process's key
        clock.now += 61
        self.assertFalse(tokens.valid(token, "container-a"))


class TestNormalizePath(unittest.TestCase):

    def test_resolution(self):
        cases = {
            "/latest/meta-data/": "/latest/meta-data/",
            "//latest//meta-data//iam/": "/latest/meta-data/iam/",
            "/latest/./meta-data/x/../iam": "/latest/meta-data/iam",
            "/latest/meta-data/%69am/": "/latest/meta-data/iam/",
            "/latest/meta-data/iam%2Fsecurity-credentials": "/latest/meta-data/iam/security-credentials",
            "http://169.254.169.254/latest/meta-data/iam/?x=1": "/latest/meta-data/iam/",
            "HTTP://169.254.169.254": "/",
            "/latest/meta-data\\iam\\info": "/latest/meta-data/iam/info",
            "/../../latest/meta-data/..": "/latest/",
            "/latest/meta-data/%2569am": "/latest/meta-data/%69am",
            "/": "/",
        }
        for target, expected in cases.items():
            self.assertEqual(emp.normalize_path(target), expected, target)
        for target in ("latest/meta-data", "*", "/a%00b", "/a%ffb", "/a\x01", "ftp://x/"):
            with self.assertRaises(emp.BadRequest, msg=target):
                emp.normalize_path(target)


CREDENTIAL_SPELLINGS = [
    "/latest/meta-data/iam/security-credentials/host-role",
    "/latest/meta-data/iam/security-credentials/",
    "/latest/meta-data/iam/security-credentials-extended/host-role",
    "//latest//meta-data//iam//security-credentials//host-role",
    "/latest/meta-data/./iam/security-credentials/host-role",
    "/latest/meta-data/foo/../iam/security-credentials/host-role",
    "/latest/dynamic/../meta-data/iam/security-credentials/host-role",
    "/foo/../latest/meta-data/iam/security-credentials/host-role",
    "/latest/meta-data/%69am/security-credentials/host-role",
    "/latest/meta-data/%49AM/security-credentials/host-role",
    "/latest/meta-data/iam%2Fsecurity-credentials%2Fhost-role",
    "%2Flatest%2Fmeta-data%2Fiam%2Fsecurity-credentials%2Fhost-role",
    "/latest/meta-data/IAM/Security-Credentials/host-role",
    "/latest/META-DATA/iam/security-credentials/host-role",
    "/LATEST/meta-data/iam/security-credentials/host-role",
    "/latest/meta-data/iam\\security-credentials\\host-role",
    "/latest/meta-data/iam/security-credentials/host-role?x=../../",
    "/latest/meta-data/iam/security-credentials/host-role#frag",
    "/latest/meta-data/iam/info",
    "/latest/meta-data/iam/Info",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/meta-data/Identity-Credentials/ec2/security-credentials/ec2-instance",
    "/2016-09-02/meta-data/iam/security-credentials/host-role",
    "/1.0/meta-data/iam/security-credentials/host-role",
    "/bogus/meta-data/iam/security-credentials/host-role",
    "/latest/meta-data/iam/security-credentials/host-role/",
    "/latest/meta-data/iam/security-credentials/%2e%2e/host-role",
    "/latest/meta-data/iam/security-credentials/..%2fhost-role",
    "/latest/meta-data/placeholder/../../meta-data/iam/security-credentials/host-role",
    "/latest/user-data/../meta-data/iam/security-credentials/host-role",
    "/latest/meta-data/%2569am/security-credentials/host-role",
    "/latest/x/iam/security-credentials/host-role",
    "/security-credentials/host-role",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/host-role",
    "HTTP://169.254.169.254//latest/meta-data/iam/security-credentials/host-role",
    "http://169.254.169.254/latest/meta-data/iam/info",
]


class TestMetadataService(ProxyTestCase):
    """The whole request path over HTTP: containers told apart by their 127.0.0.x source address."""

    def setUp(self):
        super().setUp()
        self.web = self.docker.add_container("web-1", ["127.0.0.2"], labels={"ec2metaproxy.RoleAlias": "web"},
                                             emit=False)
        self.plain = self.docker.add_container("plain-1", ["127.0.0.3"], emit=False)
        self.typo = self.docker.add_container("typo-1", ["127.0.0.4"], labels={"ec2metaproxy.RoleAlias": "nope"},
                                              emit=False)
        self.start()

    def test_role_listing_then_credentials(self):
        status, headers, body = self.fx.request("/latest/meta-data/iam/security-credentials/", "127.0.0.2")
        self.assertEqual((status, body), (200, "web-role"))   # no trailing newline: botocore appends it verbatim
        self.assertEqual(headers["server"], "EC2ws")
        self.assertEqual(headers["content-type"], "text/plain")
        status, creds = self.fx.credentials("127.0.0.2", "web-role")
        self.assertEqual(status, 200)
        self.assertEqual(set(creds), {"Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token",
                                      "Expiration"})
        self.assertEqual((creds["Code"], creds["Type"]), ("Success", "AWS-HMAC"))
        remaining = time.mktime(time.strptime(creds["Expiration"], "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(
            time.gmtime())
        self.assertGreater(remaining, 1800)
        self.assertNoHostSecrets(body, creds)

    def test_default_alias_and_unknown_alias_and_unknown_caller(self):
        self.assertEqual(self.fx.request("/latest/meta-data/iam/security-credentials/", "127.0.0.3")[2],
                         "default-role")
        self.assertEqual(self.fx.credentials("127.0.0.3", "default-role")[0], 200)
        for source in ("127.0.0.4", "127.0.0.99"):
            self.assertEqual(self.fx.request("/latest/meta-data/iam/security-credentials/", source)[0], 404)
            self.assertEqual(self.fx.credentials(source, "default-role")[0], 404)
            self.assertEqual(self.fx.request("/latest/meta-data/iam/", source)[0], 404)

    def test_another_role_name_is_404_and_the_suffix_is_ignored(self):
        self.assertEqual(self.fx.credentials("127.0.0.2", "default-role")[0], 404)
        self.assertEqual(self.fx.credentials("127.0.0.2", "host-role")[0], 404)
        status, body = self.fx.credentials("127.0.0.2", "web-role/anything/else")
        self.assertEqual(status, 200)
        self.assertEqual(body["Code"], "Success")

    def test_redirects_without_the_trailing_slash(self):
        for path in ("/latest/meta-data/iam/security-credentials", "/latest/meta-data/iam",
                     "/latest/meta-data/iam/security-credentials-extended"):
            status, headers, _ = self.fx.request(path, "127.0.0.2")
            self.assertEqual(status, 301, path)
            self.assertEqual(headers["location"], path + "/")

    def test_dated_versions_extended_and_info(self):
        for version in ("latest", "2016-09-02", "1.0"):
            self.assertEqual(self.fx.credentials("127.0.0.2", "web-role", version)[0], 200, version)
        status, _, body = self.fx.request("/latest/meta-data/iam/security-credentials-extended/web-role", "127.0.0.2")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["AccountId"], ACCOUNT)
        self.assertEqual(self.fx.request("/latest/meta-data/iam/security-credentials-extended/", "127.0.0.2")[2],
                         "web-role")
        status, _, body = self.fx.request("/latest/meta-data/iam/info", "127.0.0.2")
        self.assertEqual(status, 200)
        self.assertIn(":instance-profile/web-role", json.loads(body)["InstanceProfileArn"])
        self.assertEqual(self.fx.request("/latest/meta-data/iam/", "127.0.0.2")[2], "info\nsecurity-credentials/")
        self.assertEqual(self.fx.request(
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance", "127.0.0.2")[0], 404)

    def test_no_spelling_reaches_the_hosts_credentials(self):
        answers = []
        for source in ("127.0.0.2", "127.0.0.99"):
            for path in CREDENTIAL_SPELLINGS:
                status, headers, body = self.fx.request(path, source)
                answers.append((path, status, body, headers))
                self.assertNoHostSecrets(body, headers)
                self.assertNotEqual(body, "host-role", path)
        for forwarded in self.imds.paths():
            lowered = [segment.lower() for segment in forwarded.split("/")]
            self.assertFalse(emp.CREDENTIAL_SEGMENTS.intersection(lowered), forwarded)
        # The raw request line too (http.client would normalise nothing, but be explicit).
        for raw in (b"GET /latest/meta-data/iam/security-credentials/host-role HTTP/1.1\r\n\r\n",
                    b"GET http://169.254.169.254/latest/meta-data/iam/info HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /latest/meta-data/iam/../iam/security-credentials/ HTTP/1.0\r\n\r\n"):
            self.assertNoHostSecrets(self.fx.raw(raw, "127.0.0.99"))

    def test_forwarding_other_paths_with_the_hosts_own_token(self):
        self.imds.require_token = True
        status, headers, body = self.fx.request("/latest/meta-data/instance-id", "127.0.0.2",
                                                headers={"X-aws-ec2-metadata-token": self.container_token()})
        self.assertEqual((status, body), (200, "i-0host0000000000"))
        self.assertEqual(headers["server"], "EC2ws")
        sent = [h for m, p, h in self.imds.requests if p == "/latest/meta-data/instance-id"]
        self.assertTrue(sent)
        for headers in sent:
            self.assertEqual({k.lower(): v for k, v in headers.items()}.get("x-aws-ec2-metadata-token"),
                             self.imds.token)
        status, headers, _ = self.fx.request("/latest/meta-data", "127.0.0.2")
        self.assertEqual((status, headers["location"]), (301, "/latest/meta-data/"))
        self.assertEqual(self.fx.request("/latest/meta-data/nothing-here", "127.0.0.2")[0], 404)
        self.assertEqual(self.fx.request("/latest/meta-data/instance-id", "127.0.0.2", method="HEAD")[0], 200)

    def test_forwarding_reuses_one_connection(self):
        for _ in range(20):
            self.assertEqual(self.fx.request("/latest/meta-data/local-ipv4", "127.0.0.2")[0], 200)
        self.assertLessEqual(self.imds.connections, 2)

    def test_host_token_never_reaches_a_container_and_methods_are_limited(self):
        for method in ("POST", "DELETE", "PATCH", "OPTIONS", "PUT"):
            status, headers, body = self.fx.request("/latest/meta-data/instance-id", "127.0.0.2", method=method)
            self.assertEqual(status, 405, method)
        status, _, body = self.fx.request("/latest/meta-data/instance-id", "127.0.0.2")
        self.assertNotIn(self.imds.token, body)

    def container_token(self, source="127.0.0.2", ttl="60"):
        status, headers, token = self.fx.request("/latest/api/token", source, method="PUT",
                                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})
        self.assertEqual(status, 200)
        self.assertEqual(headers["x-aws-ec2-metadata-token-ttl-seconds"], ttl)
        return token

    def test_imdsv2_tokens(self):
        token = self.container_token()
        ok = self.fx.request("/latest/meta-data/iam/security-credentials/", "127.0.0.2",
                             headers={"x-aws-ec2-metadata-token": token})
        self.assertEqual(ok[:3:2], (200, "web-role"))
        # A token taken from one container is refused in another.
        self.assertEqual(self.fx.request("/latest/meta-data/iam/security-credentials/", "127.0.0.3",
                                         headers={"X-aws-ec2-metadata-token": token})[0], 401)
        self.assertEqual(self.fx.request("/latest/meta-data/instance-id", "127.0.0.2",
                                         headers={"X-aws-ec2-metadata-token": "bogus"})[0], 401)
        # No token at all is served, like an instance with HttpTokens=optional.
        self.assertEqual(self.fx.request("/latest/meta-data/iam/security-credentials/", "127.0.0.2")[0], 200)
        # The container's token is never sent upstream.
        self.fx.request("/latest/meta-data/instance-id", "127.0.0.2", headers={"X-aws-ec2-metadata-token": token})
        for _, _, headers in self.imds.requests:
            self.assertNotEqual(headers.get("X-aws-ec2-metadata-token"), token)

    def test_token_requests_refused_like_imds(self):
        put = lambda path="/latest/api/token", **headers: self.fx.request(path, "127.0.0.2", method="PUT",
                                                                          headers=headers)[0]
        ttl = "X-aws-ec2-metadata-token-ttl-seconds"
        self.assertEqual(put(), 400)
        for bad in ("0", "21601", "abc", "-1", "1.5", ""):
            self.assertEqual(put(**{ttl: bad}), 400, bad)
        self.assertEqual(put(**{ttl: "21600"}), 200)
        self.assertEqual(put(**{ttl: "1"}), 200)
        self.assertEqual(put(**{ttl: "60", "X-Forwarded-For": "1.2.3.4"}), 403)
        self.assertEqual(put("/2016-09-02/api/token", **{ttl: "60"}), 403)
        self.assertEqual(self.fx.request("/latest/api/token", "127.0.0.2")[0], 405)
        # No Content-Length at all, lower-case header names, as SDKs send them.
        answer = self.fx.raw(b"PUT /latest/api/token HTTP/1.1\r\nhost: 169.254.169.254\r\n"
                             b"x-aws-ec2-metadata-token-ttl-seconds: 30\r\nconnection: close\r\n\r\n", "127.0.0.2")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        self.assertIn(b"X-aws-ec2-metadata-token-ttl-seconds: 30\r\n", answer)

    def test_expired_token_is_401(self):
        token = self.container_token(ttl="1")
        time.sleep(2.1)
        self.assertEqual(self.fx.request("/latest/meta-data/iam/security-credentials/", "127.0.0.2",
                                         headers={"X-aws-ec2-metadata-token": token})[0], 401)

    def test_botocore_credential_chain_through_the_proxy(self):
        self.docker.add_container("botocore-app", ["127.0.0.1"], labels={"ec2metaproxy.RoleAlias": "db"})
        script = (
            "import json, botocore.session\n"
            "session = botocore.session.Session()\n"
            "creds = session.get_credentials()\n"
            "print(json.dumps({'method': creds.method}))\n"
            "sts = session.create_client('sts', region_name='us-east-1', endpoint_url=%r)\n"
            "print(json.dumps({'arn': sts.get_caller_identity()['Arn']}))\n" % STS.moto_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://127.0.0.1:{self.fx.port}/",
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        self.assertEqual(lines[0]["method"], "iam-role")
        self.assertRegex(lines[1]["arn"], r"^arn:aws:sts::\d{12}:assumed-role/db-role/botocore-app$")
        # botocore asked for an IMDSv2 token first, as its default settings do.
        self.assertNoHostSecrets(result.stdout, result.stderr)

    def test_a_new_container_is_served_on_its_first_request(self):
        new = self.docker.add_container("fresh-1", ["127.0.0.5"], labels={"ec2metaproxy.RoleAlias": "db"})
        started = time.monotonic()
        status, creds = self.fx.credentials("127.0.0.5", "db-role")
        self.assertEqual(status, 200, creds)
        self.assertLess(time.monotonic() - started, 1.0)
        # Even without a start event (it was missed): the unknown address triggers one listing.
        self.docker.add_container("silent-1", ["127.0.0.6"], emit=False)
        self.assertEqual(self.fx.credentials("127.0.0.6", "default-role")[0], 200)
        self.assertTrue(new)

    def test_ip_reuse_never_returns_the_previous_containers_credentials(self):
        status, old = self.fx.credentials("127.0.0.2", "web-role")
        self.assertEqual(status, 200)
        for round_number in range(5):
            previous = [cid for cid, c in self.docker.containers.items()
                        if "127.0.0.2" in str(c["summary"]["NetworkSettings"])]
            for cid in previous:
                self.docker.remove_container(cid)
            # Docker reports the death before it hands the address on; the proxy drops it on that event.
            self.assertTrue(wait_until(lambda: self.fx.proxy.index.lookup("127.0.0.2") is None))
            alias = "db" if round_number % 2 == 0 else "web"
            self.docker.add_container(f"reuse-{round_number}", ["127.0.0.2"],
                                      labels={"ec2metaproxy.RoleAlias": alias})
            role = f"{alias}-role"
            status, creds = self.fx.credentials("127.0.0.2", role)
            self.assertEqual(status, 200, creds)
            self.assertNotEqual(creds["AccessKeyId"], old["AccessKeyId"])
            old = creds

    def test_sts_calls_happen_at_start_not_on_the_request_path(self):
        self.assertTrue(wait_until(lambda: STS.assume_calls() >= 2, timeout=5))   # web-1 and plain-1 prefetched
        calls = STS.assume_calls()
        docker_calls = sum(self.docker.calls.values())
        for _ in range(30):
            self.assertEqual(self.fx.credentials("127.0.0.2", "web-role")[0], 200)
            self.assertEqual(self.fx.credentials("127.0.0.3", "default-role")[0], 200)
        self.assertEqual(STS.assume_calls(), calls)
        self.assertEqual(sum(self.docker.calls.values()), docker_calls)
        self.assertEqual(STS.requests[0]["RoleSessionName"] in ("web-1", "plain-1"), True)

    def test_no_secret_reaches_the_log_even_verbose(self):
        with LogCapture() as logs:
            token = self.container_token()
            status, _, body = self.fx.request("/latest/meta-data/iam/security-credentials/web-role", "127.0.0.2",
                                              headers={"X-aws-ec2-metadata-token": token})
            creds = json.loads(body)
            self.fx.request("/latest/meta-data/instance-id", "127.0.0.2", headers={"X-aws-ec2-metadata-token": token})
            self.fx.credentials("127.0.0.3", "default-role")
        self.assertIn("127.0.0.2 web-1 web-role GET /latest/meta-data/iam/security-credentials/web-role 200",
                      logs.text)
        for secret in (creds["SecretAccessKey"], creds["Token"], token, self.imds.token, HOST_MARKER):
            self.assertNotIn(secret, logs.text)
            self.assertNotIn(secret[:20], logs.text)


class TestHttpServer(ProxyTestCase):
    """HTTP/1.1 done right, and bad requests answered the way IMDS would."""

    def setUp(self):
        super().setUp()
        self.docker.add_container("web-1", ["127.0.0.2"], labels={"ec2metaproxy.RoleAlias": "web"}, emit=False)
        self.start()

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.fx.port, timeout=5, source_address=("127.0.0.2", 0))
        self.addCleanup(conn.close)
        for _ in range(5):
            conn.request("GET", "/latest/meta-data/iam/security-credentials/")
            response = conn.getresponse()
            self.assertEqual(response.read(), b"web-role")
            self.assertIsNone(response.getheader("Connection"))
        sock = conn.sock
        conn.request("GET", "/latest/meta-data/iam/security-credentials/web-role",
                     headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        self.assertEqual(response.getheader("Connection"), "close")
        self.assertIsNotNone(sock)

    def test_http_1_0_closes_and_answers_as_1_1(self):
        answer = self.fx.raw(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\n\r\n", "127.0.0.2")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"Connection: close", answer)
        self.assertTrue(answer.endswith(b"web-role"))

    def test_pipelined_requests_are_answered_in_order(self):
        answer = self.fx.raw(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: a\r\n\r\n"
                             b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 5\r\n"
                             b"Content-Length: 0\r\n\r\n"
                             b"GET /latest/meta-data/iam/ HTTP/1.1\r\nConnection: close\r\n\r\n", "127.0.0.2")
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK"), 3, answer)

    def test_malformed_requests_get_the_status_imds_would_give(self):
        cases = [
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET /\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 505),
            (b"GET / HTTP/x\r\n\r\n", 400),
            (b"G@T / HTTP/1.1\r\n\r\n", 400),
            (b"GET /latest\x00/meta-data HTTP/1.1\r\n\r\n", 400),
            (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 414),
            (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
            (b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(300)) + b"\r\n", 431),
            (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", 400),
            (b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
            (b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            (b"GET latest HTTP/1.1\r\n\r\n", 400),
            (b"BREW /latest/meta-data/ HTTP/1.1\r\n\r\n", 405),
            (b"GET /a%ffb HTTP/1.1\r\n\r\n", 400),
        ]
        for data, status in cases:
            answer = self.fx.raw(data, "127.0.0.2")
            self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % status), (data[:60], answer[:80]))
            self.assertNoHostSecrets(answer)
        # And the proxy still serves everyone.
        self.assertEqual(self.fx.request("/latest/meta-data/iam/security-credentials/", "127.0.0.2")[2], "web-role")

    def test_request_bodies_are_read_and_discarded(self):
        answer = self.fx.raw(b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 5\r\n"
                             b"Content-Length: 5\r\n\r\nhello"
                             b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 5\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                             b"GET /latest/meta-data/iam/ HTTP/1.1\r\nConnection: close\r\n\r\n", "127.0.0.2")
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK"), 3, answer)


#####################################################################
# main ##############################################################

class ProcessTestCase(unittest.TestCase):
    """Runs ec2metaproxy.py as the operator does, and stops it by its pid."""

    def run_proxy(self, config: dict, env=None):
        tmp = tempfile.mkdtemp(prefix="emp-main-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as handle:
            json.dump(config, handle)
        log_path = os.path.join(tmp, "proxy.log")
        log_file = open(log_path, "w")
        self.addCleanup(log_file.close)
        process = subprocess.Popen([sys.executable, PROXY, "-c", path], stdout=log_file, stderr=log_file,
                                   env=dict(os.environ, **(env or {})))

        def stop():
            if process.poll() is None:
                process.kill()
                process.wait(5)
        self.addCleanup(stop)

        def logs():
            with open(log_path) as handle:
                return handle.read()
        return process, logs


class TestMain(ProcessTestCase):

    def test_starts_without_docker_or_imds_says_so_serves_and_stops_cleanly(self):
        port = free_port()
        process, logs = self.run_proxy(base_config(
            listen=f"127.0.0.1:{port}", dockerHost="unix:///nonexistent/docker.sock",
            metadataURL=f"http://127.0.0.1:{free_port()}"))
        self.assertTrue(wait_until(lambda: "listening on" in logs(), timeout=15), logs())
        self.assertTrue(wait_until(lambda: "metadata service" in logs(), timeout=5), logs())
        text = logs()
        self.assertEqual(len([l for l in text.splitlines() if "Docker is not reachable" in l]), 1, text)
        self.assertEqual(len([l for l in text.splitlines() if "is not reachable yet" in l and "metadata" in l]),
                         1, text)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "10"})
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/latest/meta-data/instance-id")
        self.assertEqual(conn.getresponse().status, 502)
        conn.close()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(10), 0)
        self.assertLess(time.monotonic() - started, 5)
        self.assertNotIn("Traceback", logs())

    def test_sigint_exits_zero(self):
        port = free_port()
        process, logs = self.run_proxy(base_config(listen=f"127.0.0.1:{port}",
                                                   dockerHost="unix:///nonexistent/docker.sock",
                                                   metadataURL=f"http://127.0.0.1:{free_port()}"))
        self.assertTrue(wait_until(lambda: "listening on" in logs(), timeout=15), logs())
        process.send_signal(signal.SIGINT)
        self.assertEqual(process.wait(10), 0)

    def test_port_in_use_and_docker_path_not_a_socket_are_one_line_errors(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            process, logs = self.run_proxy(base_config(listen=f"127.0.0.1:{busy.getsockname()[1]}"))
            self.assertEqual(process.wait(20), 1)
        self.assertRegex(logs().strip(), r"^ec2metaproxy: cannot listen on 127\.0\.0\.1:\d+: Address already in use$")
        with tempfile.NamedTemporaryFile() as not_a_socket:
            process, logs = self.run_proxy(base_config(dockerHost="unix://" + not_a_socket.name))
            self.assertEqual(process.wait(20), 1)
        self.assertEqual(logs().strip(), f"ec2metaproxy: dockerHost: {not_a_socket.name} exists but is not a unix socket")
