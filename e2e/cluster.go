package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// BuildNATSServer compiles nats-server, from the module version go.mod
// names, into dir and returns its path.
func BuildNATSServer(dir string) (string, error) {
	bin := filepath.Join(dir, "nats-server")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/nats-io/nats-server/v2")
	cmd.Dir = ModuleRoot()
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build nats-server: %v\n%s", err, out)
	}
	return bin, nil
}

// NATSCluster is three nats-server processes on loopback, each run with
// deploy/nats/nats-server.conf as an operator runs it (the node's settings
// in its environment, FM's authority included from fm-nats.conf beside
// it, a working folder of its own), with TLS on clients and routes.
type NATSCluster struct {
	t     testing.TB
	bin   string
	Nodes []*NATSNode
	// CA verifies the nodes' certificate.
	CA string
}

// NATSNode is one node of a NATSCluster.
type NATSNode struct {
	Name      string
	Dir       string
	ClientURL string // tls://127.0.0.1:port
	monitor   string
	env       []string
	proc      *Proc
}

// StartNATSCluster starts three nodes with the NATS configuration
// fmNATSConf (fm nats-config's output) and waits until each is healthy.
func StartNATSCluster(t testing.TB, natsBin, fmNATSConf string) *NATSCluster {
	t.Helper()
	return StartNATSClusterConf(t, natsBin, fmNATSConf, NodeConf(t))
}

// NodeConf is deploy/nats/nats-server.conf, the nodes' configuration.
func NodeConf(t testing.TB) string {
	t.Helper()
	conf, err := os.ReadFile(filepath.Join(ModuleRoot(), "deploy", "nats", "nats-server.conf"))
	if err != nil {
		t.Fatal(err)
	}
	return string(conf)
}

// StartNATSClusterConf is StartNATSCluster with conf as the nodes'
// configuration (NodeConf, changed).
func StartNATSClusterConf(t testing.TB, natsBin, fmNATSConf, conf string) *NATSCluster {
	t.Helper()
	dir := t.TempDir()
	tlsDir := filepath.Join(dir, "tls")
	c := &NATSCluster{t: t, bin: natsBin, CA: filepath.Join(tlsDir, "ca.pem")}
	cert, key := filepath.Join(tlsDir, "node.pem"), filepath.Join(tlsDir, "node-key.pem")
	if err := nodeCertificates(tlsDir, c.CA, cert, key); err != nil {
		t.Fatal(err)
	}
	routes := make([]string, 3)
	for i := range routes {
		routes[i] = "tls://" + FreePort(t)
	}
	for i := range 3 {
		n := &NATSNode{Name: fmt.Sprintf("nats-%d", i+1), Dir: filepath.Join(dir, fmt.Sprintf("nats-%d", i+1)), monitor: FreePort(t)}
		client := FreePort(t)
		n.ClientURL = "tls://" + client
		if err := os.MkdirAll(n.Dir, 0o700); err != nil {
			t.Fatal(err)
		}
		for name, content := range map[string][]byte{"nats-server.conf": []byte(conf), "fm-nats.conf": []byte(fmNATSConf)} {
			if err := os.WriteFile(filepath.Join(n.Dir, name), content, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		n.env = []string{"FM_NATS_NODE=" + n.Name, "FM_NATS_LISTEN=" + client, "FM_NATS_MONITOR=" + n.monitor,
			"FM_NATS_CLUSTER_LISTEN=" + strings.TrimPrefix(routes[i], "tls://"),
			"FM_NATS_ROUTE_1=" + routes[0], "FM_NATS_ROUTE_2=" + routes[1], "FM_NATS_ROUTE_3=" + routes[2],
			"FM_NATS_STORE=" + filepath.Join(n.Dir, "store"),
			"FM_NATS_TLS_CERT=" + cert, "FM_NATS_TLS_KEY=" + key, "FM_NATS_TLS_CA=" + c.CA}
		c.Nodes = append(c.Nodes, n)
	}
	for i := range c.Nodes {
		c.Start(i)
	}
	for i := range c.Nodes {
		c.WaitHealthy(i, 60*time.Second)
	}
	return c
}

// URLs is the nodes' client URLs, comma-separated, as FM's roles take them.
func (c *NATSCluster) URLs() string {
	var urls []string
	for _, n := range c.Nodes {
		urls = append(urls, n.ClientURL)
	}
	return strings.Join(urls, ",")
}

// Start starts node i (again).
func (c *NATSCluster) Start(i int) {
	c.t.Helper()
	n := c.Nodes[i]
	n.proc = StartIn(c.t, n.Dir, c.bin, n.env, "-c", "nats-server.conf")
}

// JetStream connects to the nodes with the credentials file, until the test
// ends.
func (c *NATSCluster) JetStream(t testing.TB, creds string) jetstream.JetStream {
	t.Helper()
	_, js := ConnectJetStream(t, c.URLs(), nats.UserCredentials(creds), nats.RootCAs(c.CA))
	return js
}

// LameDuck stops node i as an operator does before an upgrade: lame-duck
// mode (SIGUSR2, as nats-server --signal ldm does), in which the node moves
// its clients to the others over the configuration's lame_duck_duration,
// then stops. It waits until the node has stopped, and says how long that
// took.
func (c *NATSCluster) LameDuck(i int) time.Duration {
	c.t.Helper()
	start := time.Now()
	c.Nodes[i].proc.Signal(syscall.SIGUSR2)
	if !c.Nodes[i].proc.Wait(2 * time.Minute) {
		c.t.Fatalf("%s still runs 2 minutes after lame-duck mode began", c.Nodes[i].Name)
	}
	return time.Since(start)
}

// Kill kills node i at once (SIGKILL).
func (c *NATSCluster) Kill(i int) { c.Nodes[i].proc.Kill() }

// WaitHealthy waits until node i says it is healthy: connected to the
// cluster, with JetStream's meta group and every stream and consumer it
// holds current (/healthz).
func (c *NATSCluster) WaitHealthy(i int, timeout time.Duration) time.Duration {
	c.t.Helper()
	n := c.Nodes[i]
	start := time.Now()
	healthClient := &http.Client{Timeout: 5 * time.Second}
	var last string
	for time.Since(start) < timeout {
		if n.proc.Exited() {
			c.t.Fatalf("%s exited:\n%s", n.Name, tail(n.proc.Stderr(), 4000))
		}
		resp, err := healthClient.Get("http://" + n.monitor + "/healthz")
		if err == nil {
			b := make([]byte, 512)
			k, _ := resp.Body.Read(b)
			resp.Body.Close()
			last = string(b[:k])
			if resp.StatusCode == http.StatusOK {
				return time.Since(start)
			}
		} else {
			last = err.Error()
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("%s not healthy after %s: %s\n%s", n.Name, timeout, last, tail(n.proc.Stderr(), 4000))
	return 0
}

// nodeCertificates writes a CA and one certificate for 127.0.0.1 that the
// nodes use both to serve and, on routes, to prove themselves to each
// other (server and client use).
func nodeCertificates(dir, caFile, certFile, keyFile string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "FM test NATS CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTpl, caTpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "nats node"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"}}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	for path, block := range map[string]*pem.Block{caFile: {Type: "CERTIFICATE", Bytes: caDER},
		certFile: {Type: "CERTIFICATE", Bytes: der}, keyFile: {Type: "EC PRIVATE KEY", Bytes: keyDER}} {
		if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
			return err
		}
	}
	return nil
}
