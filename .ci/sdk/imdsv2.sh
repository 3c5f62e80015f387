#!/bin/sh
# curl through the documented IMDSv2 shell flow: PUT a token with its TTL, then GET with
# the token; then STS GetCallerIdentity signed (curl --aws-sigv4) with the credentials got.
# Prints the caller's ARN; never a token, key or credential.
#
# Usage: imdsv2.sh IMDS_URL STS_URL
set -eu
imds=$1
sts=$2

TOKEN=$(curl -sSf -X PUT "$imds/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 21600")
role=$(curl -sSf -H "X-aws-ec2-metadata-token: $TOKEN" "$imds/latest/meta-data/iam/security-credentials/")
creds=$(curl -sSf -H "X-aws-ec2-metadata-token: $TOKEN" "$imds/latest/meta-data/iam/security-credentials/$role")

field() {
    printf '%s' "$creds" | tr -d '\n' | sed -n "s/.*\"$1\" *: *\"\([^\"]*\)\".*/\1/p"
}
key=$(field AccessKeyId)
secret=$(field SecretAccessKey)
session=$(field Token)
[ -n "$key" ] && [ -n "$secret" ] && [ -n "$session" ] || { echo "imdsv2.sh: incomplete credentials" >&2; exit 1; }

answer=$(curl -sSf --aws-sigv4 "aws:amz:us-east-1:sts" --user "$key:$secret" \
    -H "X-Amz-Security-Token: $session" \
    --data "Action=GetCallerIdentity&Version=2011-06-15" "$sts/")
printf '%s' "$answer" | tr -d '\n' | sed -n 's/.*<Arn>\([^<]*\)<\/Arn>.*/\1/p'
