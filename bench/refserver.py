"""Stdlib reference point: credential JSON from memory, nothing else.

A bare ``http.server.ThreadingHTTPServer`` with the stdlib
``BaseHTTPRequestHandler`` (HTTP/1.1, Content-Length, default per-request
log line on stderr) answering ``/latest/meta-data/iam/security-credentials/
<role>`` from a JSON file of ``{role: credentials}``. Its listen backlog is
raised from the stdlib's 5 to the proxy's 1024: with 5, connections are
dropped under load and their SYN retries (1 s and more) would make the
reference look slower than its per-request cost.

    python3 bench/refserver.py PORT CREDENTIALS.json
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "/latest/meta-data/iam/security-credentials/"


def make_handler(bodies):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = bodies.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def main():
    port, creds_file = int(sys.argv[1]), sys.argv[2]
    with open(creds_file, encoding="utf-8") as f:
        bodies = {PREFIX + role: json.dumps(c).encode() for role, c in json.load(f).items()}
    ThreadingHTTPServer.request_queue_size = 1024
    ThreadingHTTPServer(("127.0.0.1", port), make_handler(bodies)).serve_forever()


if __name__ == "__main__":
    main()
