# The AWS SDK for Ruby (Debian's ruby-aws-sdk-core) asks the metadata service for
# credentials, then calls STS GetCallerIdentity with them; one JSON line per way:
# Aws::STS::Client's default chain, then Aws::InstanceProfileCredentials on its own.
# Default settings throughout; the metadata endpoint comes from
# AWS_EC2_METADATA_SERVICE_ENDPOINT (the SDK ignores any port in it and uses 80).
#
# Usage: ruby imds_credentials.rb STS_URL
require 'json'
require 'aws-sdk-core'

abort('usage: ruby imds_credentials.rb STS_URL') unless ARGV.length == 1
sts_url = ARGV[0]

begin
  chain = Aws::STS::Client.new(region: 'us-east-1', endpoint: sts_url)
  puts JSON.generate(via: 'default chain', provider: chain.config.credentials.class.name,
                     arn: chain.get_caller_identity.arn)

  explicit = Aws::STS::Client.new(region: 'us-east-1', endpoint: sts_url,
                                  credentials: Aws::InstanceProfileCredentials.new)
  puts JSON.generate(via: 'InstanceProfileCredentials', provider: 'Aws::InstanceProfileCredentials',
                     arn: explicit.get_caller_identity.arn)
rescue StandardError => e
  # The class and message only: an SDK error may carry request details.
  warn("#{e.class}: #{e.message}")
  exit 1
end
