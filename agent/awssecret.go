package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/fleetmanager/fm/internal/awsapi"
	"github.com/fleetmanager/fm/protocol"
)

// awsSecretKey reads the AWS key pair for DSS a template keeps in AWS
// Secrets Manager, as the machine's instance profile: the secret holds the
// secret access key alone (the key id is the template's), or a JSON object
// with it ("secretAccessKey", "SecretAccessKey" or
// "aws_secret_access_key") and perhaps the key id ("accessKeyId",
// "AccessKeyId" or "aws_access_key_id"). A failure that may pass is
// Unavailable, others FailedPrecondition; the secret never reaches a
// message.
func (a *Agent) awsSecretKey(ctx context.Context, c *protocol.AWSCredentials) (keyID, secret string, err error) {
	fail := func(code protocol.Code, format string, args ...any) (string, string, error) {
		return "", "", &stepError{code: code, err: fmt.Errorf(format, args...)}
	}
	imds := a.cfg.IMDSURL
	if imds == "" {
		imds = awsapi.DefaultIMDS
	}
	creds, err := awsapi.IMDS{Base: imds}.RoleCredentials(ctx)
	if errors.Is(err, awsapi.ErrNoInstanceProfile) {
		return fail(protocol.CodeFailedPrecondition, "secret %s: %v (the template's instance profile must allow secretsmanager:GetSecretValue on it)", c.SecretName, err)
	}
	if err != nil {
		return fail(protocol.CodeUnavailable, "the machine's instance profile credentials, to read secret %s: %v", c.SecretName, err)
	}
	value, err := awsapi.SecretsManager{Endpoint: a.cfg.SecretsManagerEndpoint}.SecretString(ctx, creds, c.SecretRegion, c.SecretName)
	var refused *awsapi.Error
	switch {
	case errors.As(err, &refused) && !refused.Transient():
		return fail(protocol.CodeFailedPrecondition, "secret %s in %s: %s %s (the instance profile needs secretsmanager:GetSecretValue on it)",
			c.SecretName, c.SecretRegion, refused.Code, refused.Message)
	case err != nil:
		return fail(protocol.CodeUnavailable, "secret %s in %s: %v", c.SecretName, c.SecretRegion, err)
	}
	keyID, secret = c.AccessKeyID, strings.TrimSpace(value)
	var fields map[string]string
	if json.Unmarshal([]byte(value), &fields) == nil {
		secret = first(fields, "secretAccessKey", "SecretAccessKey", "aws_secret_access_key")
		if id := first(fields, "accessKeyId", "AccessKeyId", "aws_access_key_id"); id != "" {
			keyID = id
		}
	}
	switch {
	case !protocol.ValidAWSSecret(secret):
		return fail(protocol.CodeFailedPrecondition, "secret %s in %s holds no AWS secret access key (the key alone, or JSON with secretAccessKey)", c.SecretName, c.SecretRegion)
	case !protocol.ValidAWSAccessKeyID(keyID):
		return fail(protocol.CodeFailedPrecondition, "no AWS access key id for the key kept in secret %s: set dataikuAwsAccessKeyId, or accessKeyId in the secret", c.SecretName)
	}
	return keyID, secret, nil
}

func first(m map[string]string, keys ...string) string {
	for _, k := range keys {
		if v := m[k]; v != "" {
			return v
		}
	}
	return ""
}
