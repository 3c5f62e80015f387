// The AWS SDK for JavaScript v3 asks the metadata service for credentials, then calls STS
// GetCallerIdentity with them; one JSON line per way: fromInstanceMetadata() on its own,
// then the client's default chain. Default settings (timeouts, retries, IMDSv2 first)
// throughout; the metadata endpoint comes from AWS_EC2_METADATA_SERVICE_ENDPOINT.
//
// Usage: node imds_credentials.js STS_URL
"use strict";

const { STSClient, GetCallerIdentityCommand } = require("@aws-sdk/client-sts");
const { fromInstanceMetadata } = require("@aws-sdk/credential-providers");

async function callerArn(via, options) {
  const client = new STSClient({ region: "us-east-1", endpoint: process.argv[2], ...options });
  const answer = await client.send(new GetCallerIdentityCommand({}));
  console.log(JSON.stringify({ via, arn: answer.Arn }));
}

async function main() {
  if (process.argv.length !== 3) {
    console.error("usage: node imds_credentials.js STS_URL");
    process.exit(2);
  }
  await callerArn("fromInstanceMetadata", { credentials: fromInstanceMetadata() });
  await callerArn("default chain", {});
}

main().catch((err) => {
  // The error's name and message only: an SDK error object may carry request details.
  console.error(`${err.name}: ${err.message}`);
  process.exit(1);
});
