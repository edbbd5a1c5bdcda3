package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"strings"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// Cloud accounts (/cloud-accounts, contract §4.2): the identities virtual
// networks name, which the provisioner acts as for every call on their
// instances. Only AWS accounts are made.

const kindAccount = "cloud account"

// accountView is an account as the API shows it: its secret left out, and
// how many networks name it.
func (s *Server) accountView(a api.CloudAccount) api.CloudAccount {
	a.AWSSecretAccessKey = ""
	a.NbNetworks = len(s.st.networks.filter(func(vn api.VirtualNetwork) bool { return vn.AccountID == a.ID }))
	return a
}

func (s *Server) listAccounts(r *http.Request) (any, error) {
	p, err := pageOf(r.URL.Query())
	if err != nil {
		return nil, err
	}
	all := s.st.accounts.all()
	for i := range all {
		all[i] = s.accountView(all[i])
	}
	return pageRows(p, all, func(a *api.CloudAccount) string { return a.ID }), nil
}

func (s *Server) getAccount(r *http.Request) (any, error) {
	id := r.PathValue("id")
	a, ok := s.st.accounts.view(id)
	if !ok {
		return nil, notFound(kindAccount, id)
	}
	return s.accountView(a), nil
}

// otherCloud names the cloud an account of another cloud than AWS is for,
// by the keys its creator sends.
func otherCloud(a api.CloudAccount) string {
	for k := range a.Extra {
		switch {
		case strings.HasPrefix(k, "azure"):
			return "Azure"
		case strings.HasPrefix(k, "gcp"):
			return "GCP"
		}
	}
	return ""
}

func (s *Server) createAccount(r *http.Request) (any, error) {
	var a api.CloudAccount
	if err := readJSON(r, &a); err != nil {
		return nil, err
	}
	if cloud := otherCloud(a); cloud != "" && a.AWSAuthenticationMode == "" {
		return nil, newAPIError(protocol.CodeUnimplemented, "Not supported",
			"%s cloud accounts are not supported by this Fleet Manager, which manages AWS only: create an AWS account (awsAuthenticationMode)", cloud)
	}
	if a.AWSAuthenticationMode == api.AWSAuthIAMRole {
		a.AWSExternalID = newExternalID()
	}
	normalizeAccount(&a)
	if err := validateAccount(&a); err != nil {
		return nil, err
	}
	if err := s.st.accounts.insert(r.Context(), "ca", &a, func(v *api.CloudAccount, id string) { v.ID = id }); err != nil {
		return nil, err
	}
	return s.accountView(a), nil
}

// saveAccount serves PUT /cloud-accounts/{id}: the whole object, as a
// client echoes it with its changes. The secret is write-only (a save
// without it keeps it), the external id FM's (a role's trust policy names
// it; a new one comes with a change to IAM_ROLE), nbNetworks computed.
func (s *Server) saveAccount(r *http.Request) (any, error) {
	id := r.PathValue("id")
	cur, rev, ok := s.st.accounts.get(id)
	if !ok {
		return nil, notFound(kindAccount, id)
	}
	var a api.CloudAccount
	if err := readJSON(r, &a); err != nil {
		return nil, err
	}
	rev, err := expectedRevision(kindAccount, id, a.ID, a.Revision, rev)
	if err != nil {
		return nil, err
	}
	a.ID = id
	if a.AWSSecretAccessKey == "" && a.AWSAccessKeyID == cur.AWSAccessKeyID {
		a.AWSSecretAccessKey = cur.AWSSecretAccessKey
	}
	a.AWSExternalID = cur.AWSExternalID
	if a.AWSAuthenticationMode == api.AWSAuthIAMRole && a.AWSExternalID == "" {
		a.AWSExternalID = newExternalID()
	}
	normalizeAccount(&a)
	if err := validateAccount(&a); err != nil {
		return nil, err
	}
	if err := s.st.accounts.replace(r.Context(), id, cur, &a, rev); err != nil {
		return nil, err
	}
	return s.accountView(a), nil
}

// deleteAccount serves DELETE /cloud-accounts/{id}: refused while a
// network names the account (its nbNetworks).
func (s *Server) deleteAccount(r *http.Request) (any, error) {
	id := r.PathValue("id")
	a, err := deleteGuarded(r.Context(), s.st.accounts, id, func(ctx context.Context) ([]string, error) {
		if err := s.st.networks.sync(ctx); err != nil {
			return nil, unavailable(err, "the virtual networks could not be read")
		}
		var ids []string
		for _, vn := range s.st.networks.list() {
			if vn.AccountID == id {
				ids = append(ids, vn.ID)
			}
		}
		return ids, nil
	})
	return s.finishedOp(r, "delete-cloud-account", "cloudAccount", id, map[string]any{"id": id, "label": a.Label}, err)
}

// newExternalID makes the external id an account's role is assumed with.
func newExternalID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return "fm-" + hex.EncodeToString(b)
}

func normalizeAccount(a *api.CloudAccount) {
	a.Label = trim(a.Label)
	a.Description = trim(a.Description)
	a.NbNetworks = 0 // computed, never stored
	defaultString(&a.AWSAuthenticationMode, api.AWSAuthDefaultInstance)
	// Fields of another mode go: a key pair's secret does not linger in
	// an account that now assumes a role.
	if a.AWSAuthenticationMode != api.AWSAuthIAMRole {
		a.AWSIAMRoleARN, a.AWSExternalID = "", ""
	}
	if a.AWSAuthenticationMode != api.AWSAuthKeypair {
		a.AWSAccessKeyID, a.AWSSecretAccessKey = "", ""
	}
}

func validateAccount(a *api.CloudAccount) error {
	var c checker
	c.label("label", a.Label)
	c.maxLen("description", a.Description, 2000)
	c.oneOf("awsAuthenticationMode", a.AWSAuthenticationMode, api.AWSAuthDefaultInstance, api.AWSAuthIAMRole, api.AWSAuthKeypair)
	switch a.AWSAuthenticationMode {
	case api.AWSAuthIAMRole:
		if c.required("awsIAMRoleARN", a.AWSIAMRoleARN) {
			c.match("awsIAMRoleARN", a.AWSIAMRoleARN, reRoleARN, "an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
		}
	case api.AWSAuthKeypair:
		if c.required("awsAccessKeyId", a.AWSAccessKeyID) {
			c.match("awsAccessKeyId", a.AWSAccessKeyID, reAccessKeyID, "an AWS access key id")
		}
		if c.required("awsSecretAccessKey", a.AWSSecretAccessKey) {
			c.maxLen("awsSecretAccessKey", a.AWSSecretAccessKey, 256)
		}
	}
	return c.err(kindAccount)
}

// cloudAuthOf is the identity the provisioner acts as for an instance's
// machine: its network's cloud account's, or, for a network without one,
// the tenant's cloud credentials. A key pair's secret is sealed with FM's
// key, which the provisioner holds too, since the request sits in
// FM_PROVISION.
func (s *Server) cloudAuthOf(instance string) (*protocol.CloudAuth, error) {
	in, _, ok := s.st.instances.get(instance)
	if !ok {
		return s.cloudAuth(), nil // a deletion's last request: the instance record is going
	}
	vn, _, ok := s.st.networks.get(in.VirtualNetworkID)
	if !ok || vn.AccountID == "" {
		return s.cloudAuth(), nil
	}
	a, _, ok := s.st.accounts.get(vn.AccountID)
	if !ok {
		return nil, precondition("the cloud account %s of virtual network %s does not exist", vn.AccountID, vn.ID)
	}
	switch a.AWSAuthenticationMode {
	case api.AWSAuthIAMRole:
		return &protocol.CloudAuth{Mode: protocol.CloudAuthIAMRole, RoleARN: a.AWSIAMRoleARN, ExternalID: a.AWSExternalID}, nil
	case api.AWSAuthKeypair:
		return &protocol.CloudAuth{Mode: protocol.CloudAuthKeypair, AccessKeyID: a.AWSAccessKeyID,
			SealedSecretAccessKey: s.box.Seal(a.AWSSecretAccessKey, protocol.SealedCloudSecretPlace)}, nil
	}
	return nil, nil // the provisioner's own identity
}
