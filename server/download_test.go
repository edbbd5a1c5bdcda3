package server_test

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
)

// A cloud machine's spec tells it where to download fm and its digest, and
// carries the tenant's cloud identity with the secret sealed.
func TestCloudMachineSpec(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "fm")
	content := []byte("#!/bin/sh\necho the fm binary\n")
	if err := os.WriteFile(bin, content, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(content)
	key := seal.NewKey()
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.AgentBinary, c.SecretKey = bin, key }))

	// The binary is served without an API key, with its digest.
	r := f.doAs("GET", server.DownloadPath, "", "", "")
	if r.status != 200 || string(r.body) != string(content) || r.header.Get("X-Checksum-Sha256") != hex.EncodeToString(sum[:]) {
		t.Fatalf("download: %d %q %s", r.status, r.body, r.header.Get("X-Checksum-Sha256"))
	}
	if r := f.doAs("POST", server.DownloadPath, "x", "", ""); r.status != 405 {
		t.Fatalf("POST download: %d", r.status)
	}

	f.ok(f.do("PUT", "/cloud-credentials", `{"awsAuthenticationMode":"KEYPAIR","awsAccessKeyId":"AKIAIOSFODNN7EXAMPLE",`+
		`"awsSecretAccessKey":"wJalrXUtnFEMI/K7MDENG","awsCMKId":"alias/fm-tenant"}`), nil)
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-14.0.0-kit", "14.0.0")
	body := strings.TrimSuffix(instanceBody("cloud", vn.ID, tpl.ID, im.ID), "}") + `,"volumesEncryption":"TENANT"}`
	in := f.createInstance(body)
	req := f.provisionRequest(in.ID)
	spec := req.Spec
	if spec.Agent == nil || spec.Agent.SHA256 != hex.EncodeToString(sum[:]) || !strings.HasSuffix(spec.Agent.URL, server.DownloadPath) ||
		!strings.HasPrefix(spec.Agent.URL, f.env.URL) {
		t.Fatalf("agent download = %+v (server %s)", spec.Agent, f.env.URL)
	}
	if spec.DataVolume.Encryption != "TENANT" || spec.DataVolume.KMSKeyID != "alias/fm-tenant" {
		t.Errorf("data volume = %+v", spec.DataVolume)
	}
	c := req.Cloud
	if c == nil || c.Mode != protocol.CloudAuthKeypair || c.AccessKeyID != "AKIAIOSFODNN7EXAMPLE" || strings.Contains(c.SealedSecretAccessKey, "wJalr") {
		t.Fatalf("cloud = %+v", c)
	}
	box, _ := seal.New(key)
	if secret, err := box.Open(c.SealedSecretAccessKey, protocol.SealedCloudSecretPlace); err != nil || secret != "wJalrXUtnFEMI/K7MDENG" {
		t.Fatalf("sealed secret opens to %q, %v", secret, err)
	}
}

// Without a binary to serve, the download says so and specs carry none.
func TestNoAgentBinary(t *testing.T) {
	f := start(t)
	if r := f.doAs("GET", server.DownloadPath, "", "", ""); r.status != 404 || !strings.Contains(string(r.body), "--agent-binary") {
		t.Fatalf("download: %d %s", r.status, r.body)
	}
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-14.0.0-kit", "14.0.0")
	in := f.createInstance(instanceBody("cloud", vn.ID, tpl.ID, im.ID))
	if req := f.provisionRequest(in.ID); req.Spec.Agent != nil || req.Cloud != nil {
		t.Fatalf("request = agent %+v cloud %+v", req.Spec.Agent, req.Cloud)
	}
}
