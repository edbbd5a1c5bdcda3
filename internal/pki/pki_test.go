package pki

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"testing"
)

func TestSelfSignedServes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	f, err := EnsureSelfSigned(dir, []string{"localhost", "127.0.0.1", "fm.internal"})
	if err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(f.Key)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("key mode %v", st.Mode())
	}
	srvCfg, err := ServerConfig(f)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srvCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	cli, err := ClientConfig(f.CA)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"127.0.0.1", "localhost", "fm.internal"} {
		c := cli.Clone()
		c.ServerName = name
		conn, err := tls.Dial("tcp", ln.Addr().String(), c)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		conn.Close()
	}
	// A name the certificate does not cover, or no CA, fails.
	c := cli.Clone()
	c.ServerName = "evil.example.com"
	if conn, err := tls.Dial("tcp", ln.Addr().String(), c); err == nil {
		conn.Close()
		t.Fatal("an uncovered name was accepted")
	}
	if conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: "localhost"}); err == nil {
		conn.Close()
		t.Fatal("the self-signed CA is trusted without being given")
	}
	// Kept across starts; a new host renews the server certificate only.
	ca1, _ := os.ReadFile(f.CA)
	cert1, _ := os.ReadFile(f.Cert)
	if _, err := EnsureSelfSigned(dir, []string{"localhost"}); err != nil {
		t.Fatal(err)
	}
	if cert2, _ := os.ReadFile(f.Cert); string(cert2) != string(cert1) {
		t.Fatal("the certificate changed with no new host")
	}
	if _, err := EnsureSelfSigned(dir, []string{"localhost", "new.internal"}); err != nil {
		t.Fatal(err)
	}
	ca2, _ := os.ReadFile(f.CA)
	cert3, _ := os.ReadFile(f.Cert)
	if string(ca2) != string(ca1) || string(cert3) == string(cert1) {
		t.Fatal("a new host must renew the certificate and keep the CA")
	}
	if _, err := ClientConfig(filepath.Join(dir, "none.pem")); err == nil {
		t.Fatal("a missing CA file was accepted")
	}
}
