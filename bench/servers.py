"""The servers under test, each a subprocess on 127.0.0.1, and ways to ask them.

``Server`` starts a command with its output sent to a log file (the cost of
logging stays in), waits until it answers, and always stops it by its pid.
The factories below build the three servers compared by the benchmark, plus
the trivial server that bounds the load generator.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from test_ec2metaproxy import ACCOUNT as ACCOUNT_ID, arn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/{role}"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def process_tree(pid):
    """pid and all its descendants (gunicorn's workers, for instance)."""
    pids, index = [pid], 0
    while index < len(pids):
        try:
            with open(f"/proc/{pids[index]}/task/{pids[index]}/children", encoding="ascii") as children:
                pids += [int(child) for child in children.read().split()]
        except OSError:
            pass
        index += 1
    return pids


def clean_env(**extra):
    """This process's environment without AWS_* settings, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(extra)
    return env


def get_credentials(port, source, role, timeout=5.0):
    """GET the role's credentials from source on a new connection.

    Returns (status, parsed JSON or None, seconds taken).
    """
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.request("GET", CREDENTIALS_PATH.format(role=role))
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    elapsed = time.perf_counter() - started
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    return response.status, parsed, elapsed


class Server:
    """A server process on 127.0.0.1:port, started and stopped by pid."""

    def __init__(self, name, argv, port, env, log_path):
        self.name, self.argv, self.port, self.env = name, argv, port, env
        self.log_path = Path(log_path)
        self.proc = None
        self.started_at = None

    def start(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=REPO_ROOT,
                                         stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_listening(self, timeout=30.0):
        """Block until the port accepts connections; raise if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"see {self.log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"{self.name} not listening after {timeout}s")

    def rss_mb(self):
        """Resident set size of the main process (VmRSS), in MB."""
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return None

    def cpu_seconds(self):
        """CPU time (user + system) used so far by the process and its children."""
        total = 0.0
        for pid in process_tree(self.proc.pid):
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue   # exited meanwhile
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return total

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def proxy_server(config_path, port, log_path):
    argv = [sys.executable, str(REPO_ROOT / "ec2metaproxy.py"), "-c", str(config_path)]
    return Server("ec2metaproxy", argv, port, clean_env(**AWS_TEST_ENV), log_path)


def reference_server(creds_file, port, log_path):
    argv = [sys.executable, str(BENCH_DIR / "refserver.py"), str(port), str(creds_file)]
    return Server("reference", argv, port, clean_env(), log_path)


def lyft_server(venv_python, port, log_path, docker_socket, imds_url, sts_url):
    """Lyft's metadataproxy as its README runs it, roles from IAM_ROLE env.

    AWS_REGION stays unset (metadataproxy would then force the real regional
    STS endpoint); boto3 still needs a region, so AWS_DEFAULT_REGION is set.
    """
    gunicorn = Path(venv_python).parent / "gunicorn"
    argv = [str(gunicorn), "metadataproxy:app", "--workers=2", "-k", "gevent",
            "-b", f"127.0.0.1:{port}"]
    env = clean_env(**AWS_TEST_ENV, DOCKER_URL=f"unix://{docker_socket}",
                    METADATA_URL=imds_url, DEFAULT_ACCOUNT_ID=ACCOUNT_ID,
                    AWS_ENDPOINT_URL_STS=sts_url, AWS_DEFAULT_REGION="us-east-1")
    return Server("lyft", argv, port, env, log_path)


def trivial_server(port, log_path):
    argv = [sys.executable, str(BENCH_DIR / "trivial_server.py"), str(port)]
    return Server("trivial", argv, port, clean_env(), log_path)


def write_proxy_config(path, port, aliases, docker_socket, imds_url, sts_url):
    """Write the ec2metaproxy JSON config mapping each alias to its role ARN."""
    config = {
        "listen": f"127.0.0.1:{port}",
        "aliasToARN": {alias: arn(alias) for alias in aliases},
        "defaultAlias": None,
        "aliasLabel": "ec2metaproxy.RoleAlias",
        "dockerHost": f"unix://{docker_socket}",
        "metadataURL": imds_url,
        "stsEndpoint": sts_url,
        "stsRegion": "us-east-1",
    }
    Path(path).write_text(json.dumps(config, indent=1))
    return path
