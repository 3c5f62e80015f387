"""Trivial HTTP server used only to measure the load generator's ceiling.

Answers every request with a fixed credential-sized 200 response from an
asyncio protocol, honouring ``Connection: close``; it does as little work
per request as Python allows, so the request rate the load generator reaches
against it bounds what the generator itself can drive on this machine.

    python3 bench/trivial_server.py PORT
"""

import asyncio
import sys

BODY = b'{"Code": "Success", "AccessKeyId": "' + b"A" * 20 + b'", "Token": "' + b"T" * 700 + b'"}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


class Trivial(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.transport.write(RESPONSE)
            if b"connection: close" in head.lower():
                self.transport.close()
                return


async def serve(port):
    server = await asyncio.get_running_loop().create_server(Trivial, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
