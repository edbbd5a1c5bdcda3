// Package awsapi makes the few AWS calls the agent makes on its machine,
// with the standard library alone: the agent links no AWS SDK
// (docs/architecture.md), and these need little of one. It reads the EC2
// instance metadata service (IMDSv2: the instance identity, the instance
// profile's credentials), signs requests with Signature Version 4, and
// reads a secret of AWS Secrets Manager.
//
// The agent imports it, and the test helper that keeps secrets in moto
// (mototest); FM's other roles use the AWS SDK.
package awsapi

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"
)

// DefaultIMDS is the instance metadata service's address on EC2.
const DefaultIMDS = "http://169.254.169.254"

// IMDS reads the instance metadata service at Base with a session token
// (IMDSv2, which a machine whose metadata options require it answers
// alone).
type IMDS struct {
	Base   string
	Client *http.Client // default: 2 s timeout
}

func (m IMDS) client() *http.Client {
	if m.Client != nil {
		return m.Client
	}
	return &http.Client{Timeout: 2 * time.Second}
}

func (m IMDS) ask(ctx context.Context, method, path string, header http.Header) (string, error) {
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(m.Base, "/")+path, nil)
	if err != nil {
		return "", err
	}
	req.Header = header
	resp, err := m.client().Do(req)
	if err != nil {
		return "", fmt.Errorf("the instance metadata service: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return "", fmt.Errorf("the instance metadata service: %w", err)
	}
	if resp.StatusCode == http.StatusNotFound {
		return "", fmt.Errorf("the instance metadata service has no %s: %w", path, ErrNotFound)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("the instance metadata service answered %s to %s %s", resp.Status, method, path)
	}
	return string(b), nil
}

// ErrNotFound is the metadata service's 404: what was asked is not there
// (the instance profile's credentials of a machine that has none).
var ErrNotFound = errors.New("not found")

// Get reads paths (e.g. "/latest/dynamic/instance-identity/document") in
// one session.
func (m IMDS) Get(ctx context.Context, paths ...string) ([]string, error) {
	token, err := m.ask(ctx, http.MethodPut, "/latest/api/token", http.Header{"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": {"60"}})
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(paths))
	for _, p := range paths {
		v, err := m.ask(ctx, http.MethodGet, p, http.Header{"X-Aws-Ec2-Metadata-Token": {token}})
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// ErrNoInstanceProfile says the machine has no instance profile.
var ErrNoInstanceProfile = errors.New("the machine has no instance profile (the metadata service names no role)")

// Credentials are an AWS identity's keys; Token is a session's.
type Credentials struct {
	AccessKeyID     string `json:"AccessKeyId"`
	SecretAccessKey string `json:"SecretAccessKey"`
	Token           string `json:"Token"`
}

// RoleCredentials are the credentials of the machine's instance profile.
func (m IMDS) RoleCredentials(ctx context.Context) (Credentials, error) {
	const dir = "/latest/meta-data/iam/security-credentials/"
	roles, err := m.Get(ctx, dir)
	if errors.Is(err, ErrNotFound) {
		return Credentials{}, ErrNoInstanceProfile
	}
	if err != nil {
		return Credentials{}, err
	}
	role := strings.TrimSpace(strings.SplitN(roles[0], "\n", 2)[0])
	if role == "" {
		return Credentials{}, ErrNoInstanceProfile
	}
	doc, err := m.Get(ctx, dir+url.PathEscape(role))
	if err != nil {
		return Credentials{}, err
	}
	var c Credentials
	if err := json.Unmarshal([]byte(doc[0]), &c); err != nil || c.AccessKeyID == "" || c.SecretAccessKey == "" {
		return Credentials{}, fmt.Errorf("the instance profile's credentials (role %s) are not readable: %v", role, err)
	}
	return c, nil
}

// Sign signs req, whose body is body, with Signature Version 4 for service
// in region at now (the X-Amz-Date, X-Amz-Content-Sha256, X-Amz-Security-Token
// and Authorization headers). Every header set on req is signed but those
// the AWS SDK leaves out (Authorization, User-Agent, X-Amzn-Trace-Id,
// Expect).
func Sign(req *http.Request, body []byte, c Credentials, region, service string, now time.Time) {
	now = now.UTC()
	amzDate := now.Format("20060102T150405Z")
	day := now.Format("20060102")
	sum := sha256.Sum256(body)
	payload := hex.EncodeToString(sum[:])
	req.Header.Set("X-Amz-Date", amzDate)
	req.Header.Set("X-Amz-Content-Sha256", payload)
	if c.Token != "" {
		req.Header.Set("X-Amz-Security-Token", c.Token)
	}
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	headers := map[string]string{"host": host}
	if req.ContentLength > 0 {
		headers["content-length"] = strconv.FormatInt(req.ContentLength, 10)
	}
	for k, vs := range req.Header {
		switch k = strings.ToLower(k); k {
		case "authorization", "user-agent", "x-amzn-trace-id", "expect":
			// Not signed (the SDK's list): changed on the way, or the
			// signature itself.
		default:
			headers[k] = strings.Join(trimAll(vs), ",")
		}
	}
	names := make([]string, 0, len(headers))
	for k := range headers {
		names = append(names, k)
	}
	sort.Strings(names)
	var canonHeaders strings.Builder
	for _, k := range names {
		canonHeaders.WriteString(k + ":" + headers[k] + "\n")
	}
	signed := strings.Join(names, ";")
	// Escaped twice, as every service but S3 wants it.
	path := escapePath(req.URL.EscapedPath())
	if path == "" {
		path = "/"
	}
	canonical := strings.Join([]string{req.Method, path, canonicalQuery(req.URL.Query()), canonHeaders.String(), signed, payload}, "\n")
	scope := day + "/" + region + "/" + service + "/aws4_request"
	ch := sha256.Sum256([]byte(canonical))
	toSign := "AWS4-HMAC-SHA256\n" + amzDate + "\n" + scope + "\n" + hex.EncodeToString(ch[:])
	key := hmacOf([]byte("AWS4"+c.SecretAccessKey), day)
	for _, part := range []string{region, service, "aws4_request"} {
		key = hmacOf(key, part)
	}
	sig := hex.EncodeToString(hmacOf(key, toSign))
	req.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential="+c.AccessKeyID+"/"+scope+", SignedHeaders="+signed+", Signature="+sig)
}

func hmacOf(key []byte, s string) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(s))
	return h.Sum(nil)
}

func trimAll(vs []string) []string {
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = strings.Join(strings.Fields(v), " ")
	}
	return out
}

// canonicalQuery is the query string as SigV4 wants it: keys sorted, each
// key and value escaped as RFC 3986 says (space as %20).
func canonicalQuery(q url.Values) string {
	keys := make([]string, 0, len(q))
	for k := range q {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		vs := append([]string(nil), q[k]...)
		sort.Strings(vs)
		for _, v := range vs {
			parts = append(parts, escape(k)+"="+escape(v))
		}
	}
	return strings.Join(parts, "&")
}

// escapePath escapes every byte of p but the unreserved ones and '/'.
func escapePath(p string) string {
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		c := p[i]
		if 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.' || c == '~' || c == '/' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func escape(s string) string {
	return strings.ReplaceAll(url.QueryEscape(s), "+", "%20")
}

// SecretsManager reads secrets of AWS Secrets Manager.
type SecretsManager struct {
	// Endpoint, when set, replaces https://secretsmanager.<region>.amazonaws.com
	// (tests; a VPC endpoint answers at the regional name).
	Endpoint string
	Client   *http.Client // default: 30 s timeout
	Now      func() time.Time
}

// SecretString is the string of secret name (its id or ARN) in region, read
// as c.
func (sm SecretsManager) SecretString(ctx context.Context, c Credentials, region, name string) (string, error) {
	endpoint := sm.Endpoint
	if endpoint == "" {
		endpoint = "https://secretsmanager." + region + ".amazonaws.com"
		if strings.HasPrefix(region, "cn-") {
			endpoint += ".cn"
		}
	}
	body, _ := json.Marshal(map[string]string{"SecretId": name})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(endpoint, "/")+"/", bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/x-amz-json-1.1")
	req.Header.Set("X-Amz-Target", "secretsmanager.GetSecretValue")
	now := time.Now
	if sm.Now != nil {
		now = sm.Now
	}
	Sign(req, body, c, region, "secretsmanager", now())
	client := sm.Client
	if client == nil {
		client = &http.Client{Timeout: 30 * time.Second}
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("AWS Secrets Manager: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 128<<10))
	if err != nil {
		return "", fmt.Errorf("AWS Secrets Manager: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Type    string `json:"__type"`
			Message string `json:"message"`
			Msg     string `json:"Message"`
		}
		_ = json.Unmarshal(b, &e)
		return "", &Error{Status: resp.StatusCode, Code: e.Type[strings.LastIndex(e.Type, "#")+1:], Message: e.Message + e.Msg}
	}
	var out struct {
		SecretString *string `json:"SecretString"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return "", fmt.Errorf("AWS Secrets Manager's answer does not decode: %w", err)
	}
	if out.SecretString == nil {
		return "", fmt.Errorf("secret %s holds binary data, not a string", name)
	}
	return *out.SecretString, nil
}

// Error is an AWS service's refusal.
type Error struct {
	Status        int
	Code, Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("AWS answered %d %s: %s", e.Status, e.Code, e.Message)
}

// Transient reports whether the refusal may pass if asked again (throttling,
// the service's own failures).
func (e *Error) Transient() bool {
	return e.Status >= 500 || e.Status == http.StatusTooManyRequests || e.Code == "ThrottlingException"
}
