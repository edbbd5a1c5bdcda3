package server

import (
	"crypto/tls"
	"fmt"
	"net"
	"strconv"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// LetsEncryptDirectory is Let's Encrypt's ACME directory, where machines of
// LETSENCRYPT networks obtain their certificates unless FM is told of
// another (ACMEConfig).
const LetsEncryptDirectory = "https://acme-v02.api.letsencrypt.org/directory"

// ACMEConfig is the ACME certificate authority of LETSENCRYPT networks.
type ACMEConfig struct {
	// DirectoryURL is the CA's directory (default LetsEncryptDirectory).
	DirectoryURL string
	// CAPEM, when set, is the CA certificate the directory's own HTTPS is
	// verified with (an organisation's own ACME CA); machines use their
	// system roots otherwise.
	CAPEM string
}

// The ports of a cloud machine's HTTPS front, as Dataiku's images serve
// DSS. On the local backend, where machines share the FM host, an instance
// serves HTTPS on its base port + localHTTPSOffset and plain HTTP on the
// next port, within the block of ten its base port reserves.
const (
	cloudHTTPSPort   = 443
	cloudHTTPPort    = 80
	localHTTPSOffset = 8
)

// httpsTarget is the HTTPS front a machine of network vn serves for in:
// nil for httpsStrategy NONE. The custom certificate is given as it is
// stored (clear); the caller seals it for the machine.
func (s *Server) httpsTarget(in api.Instance, vn api.VirtualNetwork, basePort int) (*protocol.HTTPSTarget, error) {
	if vn.HTTPSStrategy == "" || vn.HTTPSStrategy == api.HTTPSNone {
		return nil, nil
	}
	var strategy string
	switch vn.HTTPSStrategy {
	case api.HTTPSSelfSigned:
		strategy = protocol.HTTPSSelfSigned
	case api.HTTPSCustomCertificate:
		strategy = protocol.HTTPSCustomCertificate
	case api.HTTPSLetsEncrypt:
		strategy = protocol.HTTPSLetsEncrypt
	default:
		return nil, precondition("virtual network %s has httpsStrategy %q, which this Fleet Manager cannot serve; save the network with one of %s, %s, %s or %s",
			vn.ID, vn.HTTPSStrategy, api.HTTPSNone, api.HTTPSSelfSigned, api.HTTPSCustomCertificate, api.HTTPSLetsEncrypt)
	}
	t := &protocol.HTTPSTarget{Strategy: strategy, Redirect: vn.HTTPStrategy == api.HTTPRedirect}
	t.Port, t.HTTPPort = cloudFrontPorts(vn)
	if s.cfg.LocalBackend {
		t.Port = basePort + localHTTPSOffset
		if t.HTTPPort != 0 {
			t.HTTPPort = basePort + localHTTPSOffset + 1
		}
	}
	switch t.Strategy {
	case protocol.HTTPSCustomCertificate:
		if _, err := tls.X509KeyPair([]byte(in.SSLCertificatePEM), []byte(in.SSLCertificatePEM)); err != nil {
			return nil, precondition("virtual network %s serves DSS with httpsStrategy %s, and instance %s's sslCertificatePEM "+
				"does not hold a certificate chain with its private key (%v): set it (PUT /instances/%s) and provision again",
				vn.ID, api.HTTPSCustomCertificate, in.ID, err, in.ID)
		}
		t.Certificate = in.SSLCertificatePEM
	case protocol.HTTPSLetsEncrypt:
		dir := s.cfg.ACME.DirectoryURL
		if dir == "" {
			dir = LetsEncryptDirectory
		}
		t.ACME = &protocol.ACMETarget{DirectoryURL: dir, Email: vn.ContactMail, CACert: s.cfg.ACME.CAPEM}
	}
	if err := t.Validate(); err != nil {
		return nil, internal(err, "the HTTPS front of instance %s is not valid", in.ID)
	}
	return t, nil
}

// webPorts are the ports a cloud machine of network vn serves DSS's users
// on, which FM's web security group opens: its HTTPS front's (443, and 80
// when it redirects or answers ACME's challenges), or DSS's own port when
// it has none. DSS's own port is not opened beside a front: a client
// could reach DSS in clear there.
func webPorts(vn api.VirtualNetwork, dssPort int) []int {
	if vn.HTTPSStrategy == "" || vn.HTTPSStrategy == api.HTTPSNone {
		return []int{dssPort}
	}
	https, http := cloudFrontPorts(vn)
	if http == 0 {
		return []int{https}
	}
	return []int{https, http}
}

// cloudFrontPorts are the ports of a cloud machine's HTTPS front in network
// vn: 443, and 80 when it redirects HTTP or answers ACME's challenges (0
// when it serves no plain HTTP).
func cloudFrontPorts(vn api.VirtualNetwork) (https, http int) {
	if vn.HTTPStrategy == api.HTTPRedirect || vn.HTTPSStrategy == api.HTTPSLetsEncrypt {
		return cloudHTTPSPort, cloudHTTPPort
	}
	return cloudHTTPSPort, 0
}

// publicURL is where DSS answers: https when the agent reports its HTTPS
// front serving (the port left out when it is 443), its own port
// otherwise.
func publicURL(host string, dss *protocol.DSSStatus, port int) string {
	if h := dss.HTTPS; h != nil && h.Serving && h.Port != 0 {
		if h.Port == 443 {
			return "https://" + hostForURL(host)
		}
		return "https://" + net.JoinHostPort(host, strconv.Itoa(h.Port))
	}
	return fmt.Sprintf("http://%s", net.JoinHostPort(host, strconv.Itoa(port)))
}

// hostForURL brackets an IPv6 address.
func hostForURL(host string) string {
	if ip := net.ParseIP(host); ip != nil && ip.To4() == nil {
		return "[" + host + "]"
	}
	return host
}
