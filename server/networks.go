package server

import (
	"context"
	"net/http"

	"github.com/fleetmanager/fm/api"
)

// NetworkDefaults is FM's own network, used by a virtual network created with
// useDefaultValues=True.
type NetworkDefaults struct {
	VpcID    string
	SubnetID string
	Region   string
}

const kindNetwork = "virtual network"

func (s *Server) listNetworks(r *http.Request) (any, error) {
	p, err := pageOf(r.URL.Query())
	if err != nil {
		return nil, err
	}
	return pageRows(p, s.st.networks.all(), func(vn *api.VirtualNetwork) string { return vn.ID }), nil
}

func (s *Server) getNetwork(r *http.Request) (any, error) {
	id := r.PathValue("id")
	vn, ok := s.st.networks.view(id)
	if !ok {
		return nil, notFound(kindNetwork, id)
	}
	return vn, nil
}

func (s *Server) createNetwork(r *http.Request) (any, error) {
	useDefaults, err := queryBool(r, "useDefaultValues", false)
	if err != nil {
		return nil, err
	}
	var vn api.VirtualNetwork
	if err := readJSON(r, &vn); err != nil {
		return nil, err
	}
	if useDefaults {
		d := s.cfg.Network
		if d.VpcID == "" || d.SubnetID == "" {
			return nil, invalid("useDefaultValues: this Fleet Manager has no default network configured; " +
				"pass useDefaultValues=False with awsVpcId and awsSubnetId")
		}
		vn.AWSVpcID, vn.AWSSubnetID = d.VpcID, d.SubnetID
		if vn.AWSRegion == "" {
			vn.AWSRegion = d.Region
		}
	}
	normalizeNetwork(&vn)
	if err := validateNetwork(&vn); err != nil {
		return nil, err
	}
	if err := s.checkPeering(vn); err != nil {
		return nil, err
	}
	ctx := r.Context()
	if vn.AccountID != "" {
		// The bucket is read where the copy lacks the account (made on
		// another replica a moment ago).
		if err := ensureUsable(ctx, s.st.accounts, vn.AccountID); err != nil {
			return nil, referenceError(kindNetwork, "accountId", err)
		}
	}
	if err := s.st.networks.insert(ctx, "vn", &vn, func(v *api.VirtualNetwork, id string) { v.ID = id }); err != nil {
		return nil, err
	}
	// Checked against the copy; now against the bucket, so that an account
	// deleted meanwhile is noticed by one side or the other (deleteGuarded).
	if vn.AccountID != "" {
		if err := ensureUsable(ctx, s.st.accounts, vn.AccountID); err != nil {
			if eerr := s.st.networks.erase(context.WithoutCancel(ctx), vn.ID, vn, vn.Revision); eerr != nil {
				s.log.Error().Err(eerr).Str("network", vn.ID).Msg("rolling back a network whose account vanished failed")
			}
			return nil, referenceError(kindNetwork, "accountId", err)
		}
	}
	return vn, nil
}

func (s *Server) saveNetwork(r *http.Request) (any, error) {
	id := r.PathValue("id")
	cur, rev, ok := s.st.networks.get(id)
	if !ok {
		return nil, notFound(kindNetwork, id)
	}
	var vn api.VirtualNetwork
	if err := readJSON(r, &vn); err != nil {
		return nil, err
	}
	rev, err := expectedRevision(kindNetwork, id, vn.ID, vn.Revision, rev)
	if err != nil {
		return nil, err
	}
	vn.ID = id
	var c checker
	keepImmutable(&c, "mode", &vn.Mode, cur.Mode)
	keepImmutable(&c, "awsVpcId", &vn.AWSVpcID, cur.AWSVpcID)
	keepImmutable(&c, "awsSubnetId", &vn.AWSSubnetID, cur.AWSSubnetID)
	keepImmutable(&c, "awsRegion", &vn.AWSRegion, cur.AWSRegion)
	keepImmutable(&c, "accountId", &vn.AccountID, cur.AccountID)
	if cur.AWSSecondSubnetID != "" {
		// It can be added later, but not changed once set.
		keepImmutable(&c, "awsSecondSubnetId", &vn.AWSSecondSubnetID, cur.AWSSecondSubnetID)
	}
	if err := c.err(kindNetwork); err != nil {
		return nil, err
	}
	normalizeNetwork(&vn)
	if err := validateNetwork(&vn); err != nil {
		return nil, err
	}
	if err := s.checkPeering(vn); err != nil {
		return nil, err
	}
	if err := s.st.networks.replace(r.Context(), id, cur, &vn, rev); err != nil {
		return nil, err
	}
	return vn, nil
}

func (s *Server) deleteNetwork(r *http.Request) (any, error) {
	id := r.PathValue("id")
	vn, err := deleteGuarded(r.Context(), s.st.networks, id, func(ctx context.Context) ([]string, error) {
		users, err := s.instancesWhere(ctx, func(in *api.Instance) bool { return in.VirtualNetworkID == id })
		if err != nil {
			return nil, err
		}
		lbs, err := s.lbsOnNetwork(ctx, id)
		return append(users, lbs...), err
	})
	return s.finishedOp(r, "delete-virtual-network", "virtualNetwork", id, map[string]any{"id": id, "label": vn.Label}, err)
}

// expectedRevision is the revision a save must find: the one the caller read,
// if its body carries one (Dataiku's client echoes what it read), else the
// current one. A body id that names another object is refused.
func expectedRevision(kind, pathID, bodyID string, bodyRev, curRev uint64) (uint64, error) {
	if bodyID != "" && bodyID != pathID {
		return 0, invalid("id: the body is %s %q but the path names %q", kind, bodyID, pathID)
	}
	if bodyRev != 0 && bodyRev != curRev {
		return 0, conflict("%s %s was changed by someone else since revision %d (it is at %d); read it again and retry",
			kind, pathID, bodyRev, curRev)
	}
	return curRev, nil
}

// keepImmutable fills an absent immutable field from the stored value and
// refuses a different one.
func keepImmutable(c *checker, field string, v *string, stored string) {
	switch {
	case *v == "":
		*v = stored
	case *v != stored:
		c.fail(field, "cannot be changed after creation (it is %q)", stored)
	}
}

func normalizeNetwork(vn *api.VirtualNetwork) {
	vn.Label = trim(vn.Label)
	defaultString(&vn.Mode, api.ModeExistingMonotenant)
	defaultString(&vn.InternetAccessMode, api.InternetAccessYes)
	if vn.AWSAutoCreateSecurityGroups == nil {
		vn.AWSAutoCreateSecurityGroups = api.Bool(len(vn.AWSSecurityGroups) == 0)
	}
	if vn.AWSSecurityGroups == nil {
		vn.AWSSecurityGroups = []string{}
	}
	if vn.AWSAssignPublicIP == nil {
		vn.AWSAssignPublicIP = api.Bool(true)
	}
	defaultString(&vn.DNSStrategy, api.DNSNone)
	defaultString(&vn.HTTPSStrategy, api.HTTPSNone)
	defaultString(&vn.HTTPStrategy, api.HTTPDisable)
	defaultString(&vn.NodesDirectoryDeployerMode, api.DeployerNoManaged)
	if vn.CloudTags == nil {
		vn.CloudTags = map[string]string{}
	}
}

// checkPeering refuses autoCreatePeerings where there is nothing to peer
// with: FM was not told its own VPC (fm server --default-vpc), or the
// network is that VPC.
func (s *Server) checkPeering(vn api.VirtualNetwork) error {
	if !vn.AutoCreatePeerings {
		return nil
	}
	var c checker
	switch {
	case s.cfg.Network.VpcID == "":
		c.fail("autoCreatePeerings", "this Fleet Manager does not know its own VPC to peer with (start fm server with --default-vpc and --default-subnet)")
	case s.cfg.Network.VpcID == vn.AWSVpcID:
		c.fail("autoCreatePeerings", "the network is in Fleet Manager's own VPC %s: there is nothing to peer", vn.AWSVpcID)
	}
	return c.err(kindNetwork)
}

func validateNetwork(vn *api.VirtualNetwork) error {
	var c checker
	c.label("label", vn.Label)
	c.oneOf("mode", vn.Mode, api.ModeExistingMonotenant)
	c.oneOf("internetAccessMode", vn.InternetAccessMode, api.InternetAccessYes, api.InternetAccessNo, api.InternetAccessEgressOnly)
	if c.required("awsVpcId", vn.AWSVpcID) {
		c.match("awsVpcId", vn.AWSVpcID, reVpcID, "a VPC id (vpc-…)")
	}
	if c.required("awsSubnetId", vn.AWSSubnetID) {
		c.match("awsSubnetId", vn.AWSSubnetID, reSubnetID, "a subnet id (subnet-…)")
	}
	c.match("awsSecondSubnetId", vn.AWSSecondSubnetID, reSubnetID, "a subnet id (subnet-…)")
	if vn.AWSSecondSubnetID != "" && vn.AWSSecondSubnetID == vn.AWSSubnetID {
		c.fail("awsSecondSubnetId", "must differ from awsSubnetId")
	}
	c.match("awsRegion", vn.AWSRegion, reRegion, "an AWS region (e.g. eu-west-1)")

	sgs := vn.AWSSecurityGroups
	if *vn.AWSAutoCreateSecurityGroups {
		if len(sgs) > 0 {
			c.fail("awsSecurityGroups", "must be empty when awsAutoCreateSecurityGroups is true")
		}
	} else {
		switch {
		case len(sgs) == 0:
			c.fail("awsSecurityGroups", "at least one security group is required when awsAutoCreateSecurityGroups is false")
		case len(sgs) > 5:
			c.fail("awsSecurityGroups", "at most 5 security groups are allowed (got %d)", len(sgs))
		}
		seen := map[string]bool{}
		for _, sg := range sgs {
			c.match("awsSecurityGroups", sg, reSGID, "a security group id (sg-…)")
			if sg == "" {
				c.fail("awsSecurityGroups", "an entry is empty")
			}
			if seen[sg] {
				c.fail("awsSecurityGroups", "%s is listed twice", sg)
			}
			seen[sg] = true
		}
	}

	c.oneOf("dnsStrategy", vn.DNSStrategy, api.DNSNone, api.DNSVNSpecificCloudDNS)
	c.match("awsRoute53PrivateIPZoneId", vn.AWSRoute53PrivateIPZone, reZoneID, "a Route53 hosted zone id (Z…)")
	c.match("awsRoute53PublicIPZoneId", vn.AWSRoute53PublicIPZone, reZoneID, "a Route53 hosted zone id (Z…)")
	if vn.DNSStrategy == api.DNSVNSpecificCloudDNS && vn.AWSRoute53PrivateIPZone == "" && vn.AWSRoute53PublicIPZone == "" {
		c.fail("dnsStrategy", "%s needs awsRoute53PrivateIPZoneId or awsRoute53PublicIPZoneId", api.DNSVNSpecificCloudDNS)
	}
	if vn.AWSRoute53PrivateIPZone != "" && vn.AWSRoute53PrivateIPZone == vn.AWSRoute53PublicIPZone {
		c.fail("awsRoute53PublicIPZoneId", "must differ from awsRoute53PrivateIPZoneId")
	}

	c.oneOf("httpsStrategy", vn.HTTPSStrategy, api.HTTPSNone, api.HTTPSSelfSigned, api.HTTPSCustomCertificate, api.HTTPSLetsEncrypt)
	c.oneOf("httpStrategy", vn.HTTPStrategy, api.HTTPDisable, api.HTTPRedirect)
	if vn.HTTPSStrategy == api.HTTPSNone && vn.HTTPStrategy == api.HTTPRedirect {
		c.fail("httpStrategy", "cannot redirect to HTTPS when httpsStrategy is NONE")
	}
	if vn.HTTPSStrategy == api.HTTPSLetsEncrypt {
		c.required("contactMail", vn.ContactMail)
	}
	c.email("contactMail", vn.ContactMail)

	c.oneOf("nodesDirectoryDeployerMode", vn.NodesDirectoryDeployerMode, api.DeployerNoManaged, api.DeployerCentral, api.DeployerEachDesignNode)
	c.maxLen("eventServerNodeLabel", vn.EventServerNodeLabel, 200)
	c.maxLen("governServerNodeLabel", vn.GovernServerNodeLabel, 200)
	c.cloudTags("cloudTags", vn.CloudTags)
	return c.err(kindNetwork)
}
