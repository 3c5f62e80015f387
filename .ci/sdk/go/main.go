// Command sdk-client asks the metadata service for credentials the way the AWS SDK for
// Go v2 does, then calls STS GetCallerIdentity with them and prints one JSON line per way:
// ec2rolecreds.Provider on its own, then config.LoadDefaultConfig's whole chain.
// Built offline from Debian's sources: GO111MODULE=off GOPATH=/usr/share/gocode go build.
//
// Usage: sdk-client STS_URL  (the metadata endpoint comes from AWS_EC2_METADATA_SERVICE_ENDPOINT)
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/service/sts"
)

func callerArn(ctx context.Context, cfg aws.Config, stsURL string) (string, error) {
	client := sts.NewFromConfig(cfg, func(o *sts.Options) {
		o.EndpointResolver = sts.EndpointResolverFromURL(stsURL)
	})
	out, err := client.GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
	if err != nil {
		return "", err
	}
	return aws.ToString(out.Arn), nil
}

func report(via, source, arn string) {
	line, _ := json.Marshal(map[string]string{"via": via, "source": source, "arn": arn})
	fmt.Println(string(line))
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: sdk-client STS_URL")
		os.Exit(2)
	}
	stsURL := os.Args[1]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// The default chain: no env keys, no shared files, so only IMDS can answer.
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion("us-east-1"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "LoadDefaultConfig:", err)
		os.Exit(1)
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "default chain:", err)
		os.Exit(1)
	}
	arn, err := callerArn(ctx, cfg, stsURL)
	if err != nil {
		fmt.Fprintln(os.Stderr, "GetCallerIdentity (default chain):", err)
		os.Exit(1)
	}
	report("LoadDefaultConfig", creds.Source, arn)

	// ec2rolecreds on its own, in a config that has no other way to get credentials.
	provider := ec2rolecreds.New()
	only := aws.Config{Region: "us-east-1", Credentials: aws.NewCredentialsCache(provider)}
	creds, err = only.Credentials.Retrieve(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ec2rolecreds:", err)
		os.Exit(1)
	}
	arn, err = callerArn(ctx, only, stsURL)
	if err != nil {
		fmt.Fprintln(os.Stderr, "GetCallerIdentity (ec2rolecreds):", err)
		os.Exit(1)
	}
	report("ec2rolecreds", creds.Source, arn)
}
