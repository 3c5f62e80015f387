"""The test module's stand-ins, started together for one benchmark phase.

Docker Engine (unix socket), STS (moto behind a recording front) and host
IMDS come from test_ec2metaproxy.py; this module only composes them.
"""

import contextlib

from test_ec2metaproxy import DockerStandIn, ImdsStandIn, StsStandIn


class StandIns:
    """Docker, STS and IMDS stand-ins as a context manager; all stopped on exit."""

    def __init__(self, docker_socket):
        self.docker_socket = str(docker_socket)
        self.docker = DockerStandIn(self.docker_socket)
        self.sts = StsStandIn()
        self.imds = ImdsStandIn()
        self._stack = contextlib.ExitStack()

    @property
    def sts_times(self):
        """Monotonic times of every STS call so far, in order."""
        return self.sts.call_times

    def __enter__(self):
        with contextlib.ExitStack() as stack:
            for standin in (self.sts, self.imds, self.docker):
                standin.start()
                stack.callback(standin.stop)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        self._stack.close()
