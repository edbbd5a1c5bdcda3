package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// Cloud accounts (/cloud-accounts, contract §4.2): the identities virtual
// networks name, which the provisioner acts as for every call on their
// instances. Only AWS accounts are made.

const kindAccount = "cloud account"

// maxExtraKeys bounds what an object (an account, a load balancer) keeps
// of the keys FM does not know (a client's echo of another FM's fields).
const maxExtraKeys = 64 << 10

// networksByAccount counts the networks that name each account: one look
// at the networks, whatever the number of accounts shown.
func (s *Server) networksByAccount() map[string]int {
	n := map[string]int{}
	for _, vn := range s.st.networks.list() {
		if vn.AccountID != "" {
			n[vn.AccountID]++
		}
	}
	return n
}

// accountView is an account as the API shows it: its secret left out, and
// how many networks name it (networksByAccount).
func accountView(a api.CloudAccount, networks map[string]int) api.CloudAccount {
	a.AWSSecretAccessKey = ""
	a.NbNetworks = networks[a.ID]
	return a
}

func (s *Server) listAccounts(r *http.Request) (any, error) {
	p, err := pageOf(r.URL.Query())
	if err != nil {
		return nil, err
	}
	all, networks := s.st.accounts.all(), s.networksByAccount()
	for i := range all {
		all[i] = accountView(all[i], networks)
	}
	return pageRows(p, all, func(a *api.CloudAccount) string { return a.ID }), nil
}

func (s *Server) getAccount(r *http.Request) (any, error) {
	id := r.PathValue("id")
	a, ok := s.st.accounts.view(id)
	if !ok {
		return nil, notFound(kindAccount, id)
	}
	return accountView(a, s.networksByAccount()), nil
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
	return accountView(a, s.networksByAccount()), nil
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
	// Dataiku's client saves what it read, and does not read the account
	// again after a save (contract §3.7): a second save carries the
	// revision before the first. The body's revision is not checked;
	// the write is, against the revision read here.
	rev, err := expectedRevision(kindAccount, id, a.ID, 0, rev)
	if err != nil {
		return nil, err
	}
	a.ID = id
	// A save that leaves the identity out keeps it (a hand-written
	// body), rather than falling back to the provisioner's own.
	if a.AWSAuthenticationMode == "" {
		a.AWSAuthenticationMode = cur.AWSAuthenticationMode
		if a.AWSIAMRoleARN == "" {
			a.AWSIAMRoleARN = cur.AWSIAMRoleARN
		}
		if a.AWSAccessKeyID == "" {
			a.AWSAccessKeyID = cur.AWSAccessKeyID
		}
	}
	if a.AWSSecretAccessKey == "" && a.AWSAccessKeyID == cur.AWSAccessKeyID {
		a.AWSSecretAccessKey = cur.AWSSecretAccessKey
	}
	if a.AWSAuthenticationMode != cur.AWSAuthenticationMode || a.AWSIAMRoleARN != cur.AWSIAMRoleARN {
		if err := s.accountUnused(r.Context(), id); err != nil {
			return nil, err
		}
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
	return accountView(a, s.networksByAccount()), nil
}

// accountUnused refuses to change whose identity an account is while
// anything on its networks lives in the cloud under it: a machine, a data
// volume or a snapshot would be looked for under the new identity, not
// found, and taken for gone.
func (s *Server) accountUnused(ctx context.Context, id string) error {
	ids, err := s.networksOfAccount(ctx, id)
	if err != nil || len(ids) == 0 {
		return err
	}
	networks := map[string]bool{}
	for _, vn := range ids {
		networks[vn] = true
	}
	if err := s.st.instances.sync(ctx); err != nil {
		return unavailable(err, "the instances could not be read")
	}
	// One look at the snapshots: those of the networks' instances, and
	// those that outlived their instance (recorded with their network).
	snapped := map[string]bool{}
	for _, sn := range s.st.snapshots.list() {
		snapped[sn.InstanceID] = true
	}
	var using []string
	for _, in := range s.st.instances.list() {
		if !networks[in.VirtualNetworkID] {
			continue
		}
		m, _, _ := s.st.machines.get(in.ID)
		if m.HasMachine() || m.VolumeID != "" || snapped[in.ID] {
			using = append(using, in.ID)
		}
	}
	for _, sn := range s.st.snapshots.list() {
		if networks[sn.VirtualNetworkID] && !slices.Contains(using, sn.InstanceID) {
			using = append(using, sn.InstanceID)
		}
	}
	if len(using) > 0 {
		return precondition("cloud account %s is the identity of machines, volumes or snapshots of %s: they would no longer be found; "+
			"deprovision and delete them (and their snapshots) first, or make a new account for another identity", id, describeUsers(using))
	}
	return nil
}

// deleteAccount serves DELETE /cloud-accounts/{id}: refused while a
// network names the account (its nbNetworks).
func (s *Server) deleteAccount(r *http.Request) (any, error) {
	id := r.PathValue("id")
	a, err := deleteGuarded(r.Context(), s.st.accounts, id, func(ctx context.Context) ([]string, error) {
		return s.networksOfAccount(ctx, id)
	})
	return s.finishedOp(r, "delete-cloud-account", "cloudAccount", id, map[string]any{"id": id, "label": a.Label}, err)
}

// networksOfAccount lists the networks that name an account, as the bus
// holds them now (the copy synced first).
func (s *Server) networksOfAccount(ctx context.Context, id string) ([]string, error) {
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
	checkAWSIdentity(&c, a.AWSAuthenticationMode, a.AWSIAMRoleARN, a.AWSAccessKeyID, a.AWSSecretAccessKey)
	extra := 0
	for k, v := range a.Extra {
		extra += len(k) + len(v)
	}
	if extra > maxExtraKeys {
		c.fail("(other keys)", "the keys FM does not know take %d bytes; at most %d are kept", extra, maxExtraKeys)
	}
	return c.err(kindAccount)
}

// cloudAuthOf is the identity the provisioner acts as for a request about
// an instance's machine: its network's cloud account's, or, for a network
// without one, the tenant's cloud credentials. The snapshot of an instance
// deleted since goes by the network recorded with it (one recorded before
// cloud accounts existed: the tenant's). There is no fallback: acting as
// another identity than the one that made a machine finds nothing, and
// takes what it did not find for gone.
func (s *Server) cloudAuthOf(instance string, req protocol.ProvisionRequest) (*protocol.CloudAuth, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	networkID := ""
	if in, _, err := s.st.instances.getOrFetch(ctx, instance); err == nil {
		networkID = in.VirtualNetworkID
	} else if !errors.Is(err, errNotFound) {
		return nil, unavailable(err, "the instance could not be read")
	} else if req.Snapshot == nil {
		return nil, notFound(kindInstance, instance)
	} else if sn, _, err := s.st.snapshots.getOrFetch(ctx, req.Snapshot.ID); err != nil {
		return nil, unavailable(err, "the snapshot could not be read")
	} else if networkID = sn.VirtualNetworkID; networkID == "" {
		return s.cloudAuth(), nil
	}
	vn, _, err := s.st.networks.getOrFetch(ctx, networkID)
	if errors.Is(err, errNotFound) {
		return nil, precondition("the virtual network %s of instance %s does not exist", networkID, instance)
	} else if err != nil {
		return nil, unavailable(err, "the virtual network could not be read")
	}
	return s.cloudAuthOfNetwork(ctx, vn)
}

// cloudAuthOfNetwork is the identity the provisioner acts as for what is
// on a network: its cloud account's, or the tenant's cloud credentials.
func (s *Server) cloudAuthOfNetwork(ctx context.Context, vn api.VirtualNetwork) (*protocol.CloudAuth, error) {
	if vn.AccountID == "" {
		return s.cloudAuth(), nil
	}
	a, _, err := s.st.accounts.getOrFetch(ctx, vn.AccountID)
	if errors.Is(err, errNotFound) {
		return nil, precondition("the cloud account %s of virtual network %s does not exist", vn.AccountID, vn.ID)
	} else if err != nil {
		return nil, unavailable(err, "the cloud account could not be read")
	}
	return s.awsIdentity(a.AWSAuthenticationMode, a.AWSIAMRoleARN, a.AWSExternalID, a.AWSAccessKeyID, a.AWSSecretAccessKey), nil
}

// awsIdentity is an AWS identity as a provision request carries it: nil
// for the provisioner's own; a key pair's secret sealed with FM's key,
// which the provisioner holds too (the request sits in FM_PROVISION).
func (s *Server) awsIdentity(mode, roleARN, externalID, accessKeyID, secret string) *protocol.CloudAuth {
	switch mode {
	case api.AWSAuthIAMRole:
		return &protocol.CloudAuth{Mode: protocol.CloudAuthIAMRole, RoleARN: roleARN, ExternalID: externalID}
	case api.AWSAuthKeypair:
		return &protocol.CloudAuth{Mode: protocol.CloudAuthKeypair, AccessKeyID: accessKeyID,
			SealedSecretAccessKey: s.box.Seal(secret, protocol.SealedCloudSecretPlace)}
	}
	return nil
}

// checkAWSIdentity checks the fields of an AWS identity's mode (a cloud
// account's, the tenant's credentials').
func checkAWSIdentity(c *checker, mode, roleARN, accessKeyID, secret string) {
	switch mode {
	case api.AWSAuthIAMRole:
		if c.required("awsIAMRoleARN", roleARN) {
			c.match("awsIAMRoleARN", roleARN, reRoleARN, "an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
		}
	case api.AWSAuthKeypair:
		if c.required("awsAccessKeyId", accessKeyID) {
			c.match("awsAccessKeyId", accessKeyID, reAccessKeyID, "an AWS access key id")
		}
		if c.required("awsSecretAccessKey", secret) {
			c.maxLen("awsSecretAccessKey", secret, 256)
		}
	}
}
