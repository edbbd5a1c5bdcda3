package protocol

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// The HTTPS strategies a desired state names: the network's httpsStrategy
// (NONE means no HTTPSTarget at all).
const (
	HTTPSSelfSigned        = "SELF_SIGNED"
	HTTPSCustomCertificate = "CUSTOM_CERTIFICATE"
	HTTPSLetsEncrypt       = "LETSENCRYPT"
)

// HTTPSTarget is how the agent serves DSS over HTTPS: it terminates TLS on
// Port in front of DSS's base port, with a certificate the strategy says
// where to take from, and on HTTPPort answers plain HTTP with a redirect
// (and ACME's HTTP challenges).
type HTTPSTarget struct {
	Strategy string `json:"strategy"`
	// Port is where HTTPS is served (443 on a cloud machine).
	Port int `json:"port"`
	// HTTPPort, when set, is where plain HTTP is answered: a redirect to
	// HTTPS when Redirect is set (the network's httpStrategy REDIRECT),
	// otherwise only ACME's challenges (LETSENCRYPT needs them). Zero: no
	// plain HTTP besides DSS's own port.
	HTTPPort int  `json:"httpPort,omitempty"`
	Redirect bool `json:"redirect,omitempty"`
	// Certificate (CUSTOM_CERTIFICATE) is the instance's PEM: its
	// certificate chain and private key. SealedCertificate is set instead
	// when the agent has an instance key (SealedCertificatePlace).
	Certificate       string `json:"certificate,omitempty"`
	SealedCertificate string `json:"sealedCertificate,omitempty"`
	// ACME (LETSENCRYPT) is where certificates are obtained.
	ACME *ACMETarget `json:"acme,omitempty"`
}

// ACMETarget is an ACME certificate authority: Let's Encrypt, or one of an
// organisation's own.
type ACMETarget struct {
	DirectoryURL string `json:"directoryUrl"`
	Email        string `json:"email"`
	// CACert, when set, is the PEM the ACME server's own HTTPS is verified
	// with (a private ACME server); otherwise the system's roots.
	CACert string `json:"caCert,omitempty"`
}

// Validate checks the target is complete for its strategy.
func (h *HTTPSTarget) Validate() error {
	switch h.Strategy {
	case HTTPSSelfSigned, HTTPSCustomCertificate, HTTPSLetsEncrypt:
	default:
		return fmt.Errorf("https.strategy %q is not one of %s, %s, %s", h.Strategy, HTTPSSelfSigned, HTTPSCustomCertificate, HTTPSLetsEncrypt)
	}
	if h.Port < 1 || h.Port > 65535 {
		return fmt.Errorf("https.port %d is out of range", h.Port)
	}
	if h.HTTPPort < 0 || h.HTTPPort > 65535 || h.HTTPPort == h.Port {
		return fmt.Errorf("https.httpPort %d is out of range or the HTTPS port", h.HTTPPort)
	}
	if h.Redirect && h.HTTPPort == 0 {
		return errors.New("https.redirect needs an httpPort")
	}
	switch h.Strategy {
	case HTTPSCustomCertificate:
		if h.Certificate == "" && h.SealedCertificate == "" {
			return errors.New("https: CUSTOM_CERTIFICATE needs the instance's certificate")
		}
	case HTTPSLetsEncrypt:
		if h.ACME == nil {
			return errors.New("https: LETSENCRYPT needs an ACME directory")
		}
		if u, err := url.Parse(h.ACME.DirectoryURL); err != nil || u.Scheme != "https" || u.Host == "" {
			return fmt.Errorf("https.acme.directoryUrl %q is not an https URL", h.ACME.DirectoryURL)
		}
		if h.HTTPPort == 0 {
			return errors.New("https: LETSENCRYPT needs an httpPort for ACME's HTTP challenges")
		}
		if strings.ContainsAny(h.ACME.Email, " \n\r") {
			return fmt.Errorf("https.acme.email %q is not an address", h.ACME.Email)
		}
	}
	return nil
}

// HTTPSStatus is what the agent reports of its HTTPS front.
type HTTPSStatus struct {
	Strategy string `json:"strategy"`
	Port     int    `json:"port"`
	// Serving is true while the front accepts connections on Port.
	Serving bool `json:"serving"`
	// Certificate is what a client asking for the machine's first name is
	// given.
	Certificate *CertificateInfo `json:"certificate,omitempty"`
	// Error says why the wanted certificate is not served (an ACME order
	// failing, no DNS name to ask for); a temporary self-signed
	// certificate is served meanwhile.
	Error string `json:"error,omitempty"`
}

// CertificateInfo describes a served certificate.
type CertificateInfo struct {
	// Source is self-signed, custom, acme, or temporary (self-signed while
	// ACME's is pending).
	Source   string   `json:"source"`
	Subject  string   `json:"subject"`
	Issuer   string   `json:"issuer"`
	DNSNames []string `json:"dnsNames,omitempty"`
	NotAfter string   `json:"notAfter"`
}

// The sources a CertificateInfo names.
const (
	CertificateSelfSigned = "self-signed"
	CertificateCustom     = "custom"
	CertificateACME       = "acme"
	CertificateTemporary  = "temporary"
)

// SealedAWSSecretPlace is where the sealed AWS secret access key of a
// desired state belongs.
func SealedAWSSecretPlace(instance string) string { return "desired/" + instance + "/aws-secret" }

// SealedCertificatePlace is where the sealed custom certificate of a
// desired state belongs.
func SealedCertificatePlace(instance string) string { return "desired/" + instance + "/certificate" }
