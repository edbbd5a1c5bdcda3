package ec2

import (
	"context"
	"fmt"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/route53"
	r53types "github.com/aws/aws-sdk-go-v2/service/route53/types"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

// dnsStrategyRoute53 is the network's dnsStrategy that makes FM manage
// records in the network's Route53 zones.
const dnsStrategyRoute53 = "VN_SPECIFIC_CLOUD_DNS_SERVICE"

// dnsTTL is the records' TTL: short, since a reprovision changes the
// addresses.
const dnsTTL = 60

// publishDNS upserts the machine's A records, <instance>.<zone>, in the
// network's private zone (private IP) and public zone (public IP), and
// withdraws those it no longer should have. They are recorded in the
// machine state's details as zone=name pairs.
func (b *Backend) publishDNS(ctx context.Context, c clients, req provisioner.Request, spec *protocol.MachineSpec, st *protocol.MachineState) error {
	want := map[string]string{} // zone -> address
	if spec != nil && spec.Network.DNSStrategy == dnsStrategyRoute53 {
		if z := spec.Network.PrivateZoneID; z != "" && st.PrivateIP != "" {
			want[z] = st.PrivateIP
		}
		if z := spec.Network.PublicZoneID; z != "" && st.PublicIP != "" {
			want[z] = st.PublicIP
		}
	}
	had := parseDNSNames(st.Details[detailDNSNames])
	names := map[string]string{}
	for zone, ip := range want {
		name, err := b.recordName(ctx, c, zone, req.Instance)
		if err != nil {
			return err
		}
		if err := changeRecord(ctx, c, r53types.ChangeActionUpsert, zone, name, ip); err != nil {
			return err
		}
		names[zone] = name
		req.Progress("dns", fmt.Sprintf("%s -> %s", strings.TrimSuffix(name, "."), ip))
		if zone == spec.Network.PublicZoneID {
			st.PublicDNS = strings.TrimSuffix(name, ".")
		} else {
			st.PrivateDNS = strings.TrimSuffix(name, ".")
		}
	}
	for zone, name := range had {
		if _, ok := names[zone]; !ok {
			if err := withdrawRecord(ctx, c, zone, name); err != nil {
				return err
			}
		}
	}
	setDNSNames(st, names)
	return nil
}

// withdrawDNS deletes the records publishDNS made.
func (b *Backend) withdrawDNS(ctx context.Context, c clients, req provisioner.Request, st *protocol.MachineState) error {
	for zone, name := range parseDNSNames(st.Details[detailDNSNames]) {
		if err := withdrawRecord(ctx, c, zone, name); err != nil {
			return err
		}
		req.Progress("dns", "record withdrawn: "+strings.TrimSuffix(name, "."))
	}
	setDNSNames(st, nil)
	return nil
}

// hostnames are the names publishDNS will give the machine, the public
// zone's first: the agent's HTTPS front certifies them (and LETSENCRYPT
// asks its CA for the first). The public zone's name is given only to a
// machine that gets a public address, as publishDNS makes its record only
// then.
func (b *Backend) hostnames(ctx context.Context, c clients, req provisioner.Request) ([]string, error) {
	spec := req.Spec
	if spec == nil || spec.Network.DNSStrategy != dnsStrategyRoute53 {
		return nil, nil
	}
	public := ""
	if (spec.Network.AssignPublicIP || spec.ElasticIP != nil) && spec.Network.Public() {
		public = spec.Network.PublicZoneID
	}
	var names []string
	for _, zone := range []string{public, spec.Network.PrivateZoneID} {
		if zone == "" {
			continue
		}
		name, err := b.recordName(ctx, c, zone, req.Instance)
		if err != nil {
			return nil, err
		}
		names = append(names, strings.TrimSuffix(name, "."))
	}
	return names, nil
}

func (b *Backend) recordName(ctx context.Context, c clients, zone, instance string) (string, error) {
	out, err := c.dns.GetHostedZone(ctx, &route53.GetHostedZoneInput{Id: aws.String(zone)})
	if isNotFound(err) {
		return "", protocol.Errorf(protocol.CodeInvalidArgument, "Route53 hosted zone %s does not exist", zone)
	}
	if err != nil {
		return "", cloudError("look up hosted zone "+zone, err)
	}
	zoneName := aws.ToString(out.HostedZone.Name)
	if !strings.HasSuffix(zoneName, ".") {
		zoneName += "."
	}
	return instance + "." + zoneName, nil
}

func changeRecord(ctx context.Context, c clients, action r53types.ChangeAction, zone, name, ip string) error {
	_, err := c.dns.ChangeResourceRecordSets(ctx, &route53.ChangeResourceRecordSetsInput{HostedZoneId: aws.String(zone),
		ChangeBatch: &r53types.ChangeBatch{Comment: aws.String("Fleet Manager"), Changes: []r53types.Change{{Action: action,
			ResourceRecordSet: &r53types.ResourceRecordSet{Name: aws.String(name), Type: r53types.RRTypeA, TTL: aws.Int64(dnsTTL),
				ResourceRecords: []r53types.ResourceRecord{{Value: aws.String(ip)}}}}}}})
	if err != nil {
		return cloudError(fmt.Sprintf("%s record %s", strings.ToLower(string(action)), name), err)
	}
	return nil
}

// withdrawRecord deletes the A record name in zone, if it is there: a
// delete must repeat the record exactly, so it is read first.
func withdrawRecord(ctx context.Context, c clients, zone, name string) error {
	out, err := c.dns.ListResourceRecordSets(ctx, &route53.ListResourceRecordSetsInput{HostedZoneId: aws.String(zone),
		StartRecordName: aws.String(name), StartRecordType: r53types.RRTypeA, MaxItems: aws.Int32(1)})
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return cloudError("look up record "+name, err)
	}
	for _, rr := range out.ResourceRecordSets {
		if strings.EqualFold(aws.ToString(rr.Name), name) && rr.Type == r53types.RRTypeA && len(rr.ResourceRecords) > 0 {
			return changeRecord(ctx, c, r53types.ChangeActionDelete, zone, name, aws.ToString(rr.ResourceRecords[0].Value))
		}
	}
	return nil
}

func parseDNSNames(s string) map[string]string {
	m := map[string]string{}
	for _, pair := range strings.Split(s, ",") {
		if zone, name, ok := strings.Cut(pair, "="); ok {
			m[zone] = name
		}
	}
	return m
}

func setDNSNames(st *protocol.MachineState, names map[string]string) {
	var pairs []string
	for zone, name := range names {
		pairs = append(pairs, zone+"="+name)
	}
	if len(pairs) == 0 {
		delete(st.Details, detailDNSNames)
		return
	}
	if st.Details == nil {
		st.Details = map[string]string{}
	}
	st.Details[detailDNSNames] = strings.Join(pairs, ",")
}
