package server

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/fleetmanager/fm/protocol"
)

// LoadEC2IdentityCerts reads AWS's public certificates for instance
// identity documents (the RSA certificates of "AWS public certificates for
// instance identity document signatures", those for the base64-encoded
// signature, one per region, in one PEM file): Config.EC2IdentityCerts. A
// certificate of another kind (the DSA or RSA-2048 ones, for the PKCS7
// signatures) would verify nothing, and is refused.
func LoadEC2IdentityCerts(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var certs []*x509.Certificate
	for rest := b; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %w", path, len(certs)+1, err)
		}
		if _, ok := c.PublicKey.(*rsa.PublicKey); !ok {
			return nil, fmt.Errorf("%s: certificate %d (%s) holds no RSA key: take the RSA certificates, those of the base64-encoded signature", path, len(certs)+1, c.Subject)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s: no PEM certificate in it", path)
	}
	return certs, nil
}

// ec2IdentityDocument is what FM reads of an instance identity document
// (AWS's format).
type ec2IdentityDocument struct {
	InstanceID string `json:"instanceId"`
}

// errMachineNotRecorded: the machine a join token was made for is not in
// fm_machines yet (the provisioner records it once launched and ready, and
// its agent may ask first); the agent asks again.
var errMachineNotRecorded = errors.New("the machine is not recorded yet")

// errNoIdentity: a join for a machine the EC2 backend launched came
// without its identity document, which its agent could not read (yet): it
// asks again, and the attempt counts as refused (whoever has only the
// token gets no further).
var errNoIdentity = errors.New("no EC2 instance identity document")

// ec2IdentityRefusal checks, when FM has AWS's certificates, that a join
// comes from the EC2 machine its token was made for: the request's
// instance identity document is signed by AWS and names the machine the
// provisioner launched for the token's provision request. It returns why
// the join is refused ("" if it may go on), or errMachineNotRecorded or
// errNoIdentity. A machine of another backend needs no document.
func (s *Server) ec2IdentityRefusal(ctx context.Context, rec joinRecord, proof *protocol.EC2Identity) (string, error) {
	if len(s.cfg.EC2IdentityCerts) == 0 {
		return "", nil
	}
	m, _, err := s.st.machines.fetch(ctx, rec.Instance)
	switch {
	case errors.Is(err, errNotFound):
		return "", errMachineNotRecorded
	case err != nil:
		return "", err
	case rec.Request != "" && m.RequestID != rec.Request, m.MachineID == "", m.Status != protocol.MachineRunning:
		// While the request is under way, the state holds the machine
		// being replaced: the new one is recorded once it runs.
		return "", errMachineNotRecorded
	case m.Backend != protocol.BackendEC2:
		return "", nil
	case proof == nil:
		return "", errNoIdentity
	}
	sig, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(proof.Signature), ""))
	if err != nil {
		return "the EC2 instance identity's signature is not base64", nil
	}
	signed := false
	for _, c := range s.cfg.EC2IdentityCerts {
		if c.CheckSignature(x509.SHA256WithRSA, []byte(proof.Document), sig) == nil {
			signed = true
			break
		}
	}
	if !signed {
		return "the EC2 instance identity document is not signed by AWS (or by a region whose certificate --ec2-identity-certs lacks)", nil
	}
	var doc ec2IdentityDocument
	if err := json.Unmarshal([]byte(proof.Document), &doc); err != nil {
		return "the EC2 instance identity document does not decode", nil
	}
	if doc.InstanceID != m.MachineID {
		return fmt.Sprintf("the EC2 instance identity is machine %q's, not %q's (launched for the token)", safeToken(doc.InstanceID), m.MachineID), nil
	}
	return "", nil
}
