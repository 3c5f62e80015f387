// A client that keeps its socket, as Node's http.Agent({keepAlive: true}) does with no
// timeout of its own: the IMDSv2 credential flow once, then the role list again after each
// pause (seconds, from the command line) on the same agent. One JSON line per request says
// whether the socket was reused, what Keep-Alive hint came back, and any error
// (ECONNRESET is what a proxy that closes a socket under a client's request causes).
//
// Usage: node keep_alive.js IMDS_URL PAUSE...
"use strict";

const http = require("http");

const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const base = new URL(process.argv[2]);

function ask(method, path, headers) {
  return new Promise((resolve) => {
    const req = http.request({ agent, method, path, headers, hostname: base.hostname,
                               port: base.port || 80, timeout: 10000 });
    req.on("timeout", () => req.destroy(Object.assign(new Error("timed out"), { code: "ETIMEDOUT" })));
    req.on("error", (err) => resolve({ error: err.code || err.message, reused: req.reusedSocket }));
    req.on("response", (res) => {
      const chunks = [];
      res.on("data", (chunk) => chunks.push(chunk));
      res.on("end", () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString(),
                                    keepAlive: res.headers["keep-alive"] || null,
                                    reused: req.reusedSocket }));
    });
    req.end();
  });
}

function sleep(seconds) {
  return new Promise((resolve) => setTimeout(resolve, seconds * 1000));
}

function report(step, answer) {
  // Never the body: it is a token or credentials.
  const { body, ...rest } = answer;
  console.log(JSON.stringify({ step, ...rest }));
}

async function main() {
  const pauses = process.argv.slice(3).map(Number);
  const token = await ask("PUT", "/latest/api/token", { "X-aws-ec2-metadata-token-ttl-seconds": "60" });
  report("token", token);
  if (token.status !== 200) process.exit(1);
  const headers = { "X-aws-ec2-metadata-token": token.body };
  const listing = await ask("GET", "/latest/meta-data/iam/security-credentials/", headers);
  report("role list", listing);
  const creds = await ask("GET", "/latest/meta-data/iam/security-credentials/" + listing.body, headers);
  report("credentials", { ...creds, code: creds.body && JSON.parse(creds.body).Code });
  for (const pause of pauses) {
    await sleep(pause);
    const again = await ask("GET", "/latest/meta-data/iam/security-credentials/", headers);
    report(`after ${pause}s`, { ...again, role: again.body });
  }
  agent.destroy();
}

main().catch((err) => {
  console.error(`${err.name}: ${err.message}`);
  process.exit(1);
});
