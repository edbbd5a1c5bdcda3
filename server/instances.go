package server

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

const kindInstance = "instance"

// Defaults for instance fields a creator leaves out.
const (
	defaultDataVolumeType   = "gp3"
	defaultDataVolumeSizeGB = 50
	defaultSnapshotPeriod   = 24
	defaultSnapshotKeep     = 7
)

// listInstances serves GET /instances: every instance, as Dataiku's FM
// answers, or FM's own page and filters of them (pageOf): state=S (one of
// the lifecycle states, or several comma-separated) and label=L (a part of
// the label, whatever its case).
func (s *Server) listInstances(r *http.Request) (any, error) {
	q := r.URL.Query()
	p, err := pageOf(q)
	if err != nil {
		return nil, err
	}
	// The generations are read before the copies: a change made meanwhile
	// leaves the list kept under generations already gone.
	key := wholeListKey{instances: s.st.instances.generation(), networks: s.st.networks.generation(),
		templates: s.st.templates.generation(), viewer: isViewer(r)}
	if p == (page{}) && !q.Has("state") && !q.Has("label") {
		if body, ok := s.listed.whole(key); ok {
			return body, nil
		}
	}
	all, filtered, err := s.instancesMatching(q)
	if err != nil {
		return nil, err
	}
	whole := p == page{} && !filtered
	all = pageRows(p, all, func(in *api.Instance) string { return in.ID })
	// What a reader sees of an instance redaction changes is encoded for
	// it alone, never taken from or left in the kept encodings.
	redacted := make([]bool, len(all))
	for i := range all {
		s.fillInstanceLabels(&all[i])
		before := all[i].SSLCertificatePEM
		redactInstance(r, &all[i])
		redacted[i] = all[i].SSLCertificatePEM != before
	}
	body, err := s.listed.list(all, redacted, whole)
	if err == nil && whole {
		s.listed.keepWhole(key, body)
	}
	return body, err
}

// instancesMatching is every instance the query's filters keep (state: one
// or several states, comma-separated; label: a part of the label, whatever
// its case; tag: an FM tag, or key=value of a cloud tag), in id order, and
// whether a filter was given.
func (s *Server) instancesMatching(q url.Values) ([]api.Instance, bool, error) {
	var states []string
	if v := q.Get("state"); v != "" {
		states = strings.Split(v, ",")
		for _, st := range states {
			if !slices.Contains(instanceStates, st) {
				return nil, false, invalid("query parameter state: %q is not one of %s", st, strings.Join(instanceStates, ", "))
			}
		}
	}
	label := strings.ToLower(q.Get("label"))
	tag := q.Get("tag")
	all := s.st.instances.all()
	if states != nil || label != "" || tag != "" {
		kept := all[:0]
		for _, in := range all {
			if label != "" && !strings.Contains(strings.ToLower(in.Label), label) {
				continue
			}
			if tag != "" && !hasTag(&in, tag) {
				continue
			}
			if states != nil && !slices.Contains(states, s.statusOf(in.ID).State) {
				continue
			}
			kept = append(kept, in)
		}
		all = kept
	}
	return all, states != nil || label != "" || tag != "", nil
}

// hasTag reports whether an instance has tag among its FM tags, or, for
// "key=value", among its cloud tags.
func hasTag(in *api.Instance, tag string) bool {
	if slices.Contains(in.FMTags, tag) {
		return true
	}
	if k, v, ok := strings.Cut(tag, "="); ok {
		got, has := in.CloudTags[k]
		return has && got == v
	}
	return false
}

func (s *Server) getInstance(r *http.Request) (any, error) {
	id := r.PathValue("id")
	in, ok := s.st.instances.view(id)
	if !ok {
		return nil, notFound(kindInstance, id)
	}
	s.fillInstanceLabels(&in)
	redactInstance(r, &in)
	return in, nil
}

// redactInstance keeps from a viewer the private key an instance's
// certificate PEM may hold; its certificates stay. (A viewer cannot save
// the instance, so nothing it reads is written back without the key.)
func redactInstance(r *http.Request, in *api.Instance) {
	if isViewer(r) {
		in.SSLCertificatePEM = certificatesOnly(in.SSLCertificatePEM)
	}
}

// certificatesOnly returns the CERTIFICATE blocks of a PEM text.
func certificatesOnly(text string) string {
	var out []byte
	rest := []byte(text)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return string(out)
		}
		if b.Type == "CERTIFICATE" {
			out = append(out, pem.EncodeToMemory(b)...)
		}
	}
}

// fillInstanceLabels sets the labels of the instance's network and template,
// which consumers read from the instance itself.
func (s *Server) fillInstanceLabels(in *api.Instance) {
	if vn, _, ok := s.st.networks.get(in.VirtualNetworkID); ok {
		in.VirtualNetworkLabel = vn.Label
	}
	if t, _, ok := s.st.templates.get(in.InstanceSettingsTemplateID); ok {
		in.InstanceSettingsTemplateLabel = t.Label
	}
}

func (s *Server) createInstance(r *http.Request) (any, error) {
	var in api.Instance
	if err := readJSON(r, &in); err != nil {
		return nil, err
	}
	s.normalizeInstance(&in)
	if err := s.validateInstance(&in); err != nil {
		return nil, err
	}
	ctx := r.Context()
	if err := s.st.instances.insert(ctx, "in", &in, func(v *api.Instance, id string) { v.ID = id }); err != nil {
		return nil, err
	}
	// The references were checked against the local copies; now that the
	// instance is written, check them against the buckets, so that a network
	// or template deleted meanwhile is noticed by one side or the other.
	if err := s.ensureReferences(ctx, &in); err != nil {
		if eerr := s.st.instances.erase(context.WithoutCancel(ctx), in.ID, in, in.Revision); eerr != nil {
			s.log.Error().Err(eerr).Str("instance", in.ID).Msg("rolling back an instance whose references vanished failed")
		}
		return nil, err
	}
	s.fillInstanceLabels(&in)
	return in, nil
}

func (s *Server) ensureReferences(ctx context.Context, in *api.Instance) error {
	if err := ensureUsable(ctx, s.st.networks, in.VirtualNetworkID); err != nil {
		return referenceError(kindInstance, "virtualNetworkId", err)
	}
	if vn, _, err := s.st.networks.getOrFetch(ctx, in.VirtualNetworkID); err == nil && vn.AccountID != "" {
		if err := ensureUsable(ctx, s.st.accounts, vn.AccountID); err != nil {
			return referenceError(kindInstance, "virtualNetworkId", err)
		}
	}
	if err := ensureUsable(ctx, s.st.templates, in.InstanceSettingsTemplateID); err != nil {
		return referenceError(kindInstance, "instanceSettingsTemplateId", err)
	}
	return nil
}

// referenceError reports a missing referenced object as a bad field of the
// request, not as a missing path.
func referenceError(kind, field string, err error) error {
	var ae *apiError
	if errors.As(err, &ae) && ae.cause == nil {
		return invalid("invalid %s: %s: %s", kind, field, ae.detail)
	}
	return err
}

func (s *Server) saveInstance(r *http.Request) (any, error) {
	id := r.PathValue("id")
	cur, rev, ok := s.st.instances.get(id)
	if !ok {
		return nil, notFound(kindInstance, id)
	}
	var in api.Instance
	if err := readJSON(r, &in); err != nil {
		return nil, err
	}
	rev, err := expectedRevision(kindInstance, id, in.ID, in.Revision, rev)
	if err != nil {
		return nil, err
	}
	in.ID = id
	var c checker
	in.DSSNodeType = strings.ToLower(in.DSSNodeType)
	keepImmutable(&c, "dssNodeType", &in.DSSNodeType, cur.DSSNodeType)
	keepImmutable(&c, "virtualNetworkId", &in.VirtualNetworkID, cur.VirtualNetworkID)
	keepImmutable(&c, "instanceSettingsTemplateId", &in.InstanceSettingsTemplateID, cur.InstanceSettingsTemplateID)
	if err := c.err(kindInstance); err != nil {
		return nil, err
	}
	s.normalizeInstance(&in)
	if err := s.validateInstance(&in); err != nil {
		return nil, err
	}
	if err := s.st.instances.replace(r.Context(), id, cur, &in, rev); err != nil {
		return nil, err
	}
	s.fillInstanceLabels(&in)
	return in, nil
}

// deleteInstance serves GET /instances/{id}/actions/delete. An instance that
// never had a machine is deleted at once (a resolved future); one with a
// machine or a data volume is deleted by the provisioner, which removes the
// volume unless keepVolume=True. An instance with a machine is refused
// unless force=True.
func (s *Server) deleteInstance(r *http.Request) (any, error) {
	id := r.PathValue("id")
	in, ok := s.st.instances.view(id)
	if !ok {
		return nil, notFound(kindInstance, id)
	}
	var opts deleteOptions
	var err error
	if opts.force, err = queryBool(r, "force", false); err != nil {
		return nil, err
	}
	if opts.keepVolume, err = queryBool(r, "keepVolume", false); err != nil {
		return nil, err
	}
	if err := s.checkUnbalanced(r.Context(), id); err != nil {
		return nil, err // asked again once the instance is claimed
	}
	m, err := s.machineOf(r.Context(), id)
	if err != nil {
		return nil, unavailable(err, "the instance's machine could not be read")
	}
	if m.Status != "" && m.Status != protocol.MachineDeleted {
		return s.act(context.WithValue(r.Context(), deleteOptionsKey{}, opts), in, s.actions()[opDelete])
	}
	return s.deleteWithoutMachine(r, in)
}

// deleteWithoutMachine deletes an instance that never had a machine, at
// once: like any action it claims the instance first (so that a reprovision
// racing it either wins, and the deletion is refused, or loses and is
// refused), then ends its operation recording the instance as deleted, and
// settles, which erases the instance and its records. A server that stops
// in between leaves the sweep to finish.
func (s *Server) deleteWithoutMachine(r *http.Request, in api.Instance) (any, error) {
	ctx := r.Context()
	for attempt := 0; attempt < 5; attempt++ {
		lc, rev, err := s.lifecycleOf(ctx, in.ID)
		if err != nil {
			return nil, unavailable(err, "the instance's state could not be read")
		}
		if lc.OpID != "" {
			busy, err := s.settleEnded(ctx, in.ID, lc, rev)
			if err != nil {
				return nil, err
			}
			if busy != nil {
				return nil, precondition("instance %s is busy with %s (operation %s)", in.ID, busy.Kind, busy.JobID)
			}
			if gone, err := s.instanceGone(ctx, in.ID); err == nil && gone {
				return nil, notFound(kindInstance, in.ID) // it was a deletion
			}
			continue // settled: look again
		}
		if !oneOfStr(lc.State, stateCreated, stateDeprovisioned, stateFailed) {
			return nil, precondition("cannot delete instance %s while it is %s", in.ID, lc.State)
		}
		op := newRunningOp(ctx, opDelete, in.ID, time.Minute)
		if _, err := s.st.ops.create(ctx, op.JobID, op); err != nil {
			return nil, unavailable(err, "the operation could not be recorded")
		}
		next := lc
		now := time.Now().UTC()
		next.State, next.Since, next.UpdatedAt, next.OpID, next.OpKind, next.Error = stateDeleting, now, now, op.JobID, opDelete, nil
		if rev == 0 {
			_, err = s.st.lifecycle.create(ctx, in.ID, next)
		} else {
			_, err = s.st.lifecycle.update(ctx, in.ID, next, rev)
		}
		if errors.Is(err, errConflict) || errors.Is(err, errExists) {
			s.forgetUnstartedOp(ctx, op)
			continue
		}
		if err != nil {
			s.forgetUnstartedOp(ctx, op)
			return nil, unavailable(err, "the instance's state could not be written")
		}
		s.crash.At("server/delete/instance-claimed")
		if err := s.refuseIfBalanced(ctx, op, lc.State); err != nil {
			return nil, err
		}
		// Claimed: no reprovision can start any more. A machine may have
		// been made before the claim, though.
		if m, _, err := s.st.machines.fetch(ctx, in.ID); err == nil && m.HasMachine() {
			_ = s.failOpTo(ctx, op, &api.Error{ErrorType: string(protocol.CodeFailedPrecondition), Message: "Instance has a machine",
				DetailedMessage: "a machine was made for the instance meanwhile"}, lc.State)
			return nil, precondition("instance %s has a machine (%s); deprovision it first, or delete with force=True", in.ID, m.Status)
		}
		if err := s.succeedOp(ctx, op, map[string]string{"id": in.ID, "label": in.Label}, stateDeleted); err != nil {
			// Ended, with the rest for the sweep to finish.
			s.log.Warn().Err(err).Str("instance", in.ID).Msg("deleted instance not erased yet; it will be")
		}
		ended, _, err := s.st.ops.fetch(ctx, op.JobID)
		if err != nil {
			return nil, unavailable(err, "the operation could not be read")
		}
		// The erase waited for the copy to drop the instance (table.remove);
		// not erased yet, the deletion is told as under way.
		return s.futureOf(ended), nil
	}
	return nil, conflict("instance %s is being changed by someone else; retry", in.ID)
}

// instancesWhere returns the ids of the instances match accepts, from a copy
// synced with the bucket.
func (s *Server) instancesWhere(ctx context.Context, match func(*api.Instance) bool) ([]string, error) {
	if err := s.st.instances.sync(ctx); err != nil {
		return nil, unavailable(err, "the instances could not be read")
	}
	var ids []string
	for _, in := range s.st.instances.list() {
		if match(&in) {
			ids = append(ids, in.ID)
		}
	}
	return ids, nil
}

func (s *Server) normalizeInstance(in *api.Instance) {
	in.Label = trim(in.Label)
	in.Description = trim(in.Description)
	in.DSSNodeType = strings.ToLower(trim(in.DSSNodeType))
	defaultString(&in.DSSNodeType, api.NodeDesign)
	defaultString(&in.CloudInstanceType, s.cfg.DefaultInstanceType)
	defaultString(&in.DataVolumeType, defaultDataVolumeType)
	if in.DataVolumeSizeGB == nil {
		in.DataVolumeSizeGB = api.Int(defaultDataVolumeSizeGB)
	}
	if in.DataVolumeSizeMaxGB == nil {
		in.DataVolumeSizeMaxGB = api.Int(2 * *in.DataVolumeSizeGB)
	}
	defaultString(&in.VolumesEncryption, api.EncryptionDefaultKey)
	if in.CloudTags == nil {
		in.CloudTags = map[string]string{}
	}
	if in.FMTags == nil {
		in.FMTags = []string{}
	}
	for i := range in.FMTags {
		in.FMTags[i] = trim(in.FMTags[i])
	}
	if in.AutomatedSnapshotPeriod == nil {
		in.AutomatedSnapshotPeriod = api.Int(defaultSnapshotPeriod)
	}
	if in.AutomatedSnapshotRetention == nil {
		in.AutomatedSnapshotRetention = api.Int(defaultSnapshotKeep)
	}
	// Derived on every read; never stored.
	in.VirtualNetworkLabel, in.InstanceSettingsTemplateLabel = "", ""
}

var volumeTypes = []string{"gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"}

func (s *Server) validateInstance(in *api.Instance) error {
	var c checker
	c.label("label", in.Label)
	c.maxLen("description", in.Description, 2000)
	c.oneOf("dssNodeType", in.DSSNodeType, api.NodeDesign, api.NodeAutomation, api.NodeDeployer, api.NodeGovern)
	if c.required("virtualNetworkId", in.VirtualNetworkID) {
		if vn, _, ok := s.st.networks.get(in.VirtualNetworkID); !ok {
			c.fail("virtualNetworkId", "virtual network %q does not exist", in.VirtualNetworkID)
		} else if vn.Deleting {
			c.fail("virtualNetworkId", "virtual network %q is being deleted", in.VirtualNetworkID)
		}
	}
	if c.required("instanceSettingsTemplateId", in.InstanceSettingsTemplateID) {
		if t, _, ok := s.st.templates.get(in.InstanceSettingsTemplateID); !ok {
			c.fail("instanceSettingsTemplateId", "instance settings template %q does not exist", in.InstanceSettingsTemplateID)
		} else if t.Deleting {
			c.fail("instanceSettingsTemplateId", "instance settings template %q is being deleted", in.InstanceSettingsTemplateID)
		}
	}
	if c.required("imageId", in.ImageID) {
		if _, _, ok := s.st.images.get(in.ImageID); !ok {
			c.fail("imageId", "image %q does not exist; GET /images lists the images this Fleet Manager can deploy", in.ImageID)
		}
	}
	c.match("cloudInstanceType", in.CloudInstanceType, reInstanceTyp, "an instance type (e.g. m5.2xlarge)")

	c.oneOf("dataVolumeType", in.DataVolumeType, volumeTypes...)
	c.rangeInt("dataVolumeSizeGB", in.DataVolumeSizeGB, 1, 16384)
	c.rangeInt("dataVolumeSizeMaxGB", in.DataVolumeSizeMaxGB, 1, 16384)
	if *in.DataVolumeSizeMaxGB < *in.DataVolumeSizeGB {
		c.fail("dataVolumeSizeMaxGB", "%d is smaller than dataVolumeSizeGB (%d)", *in.DataVolumeSizeMaxGB, *in.DataVolumeSizeGB)
	}
	checkIOPS(&c, "dataVolumeIOPS", in.DataVolumeType, in.DataVolumeIOPS)
	checkThroughput(&c, "dataVolumeThroughput", in.DataVolumeType, in.DataVolumeIOPS, in.DataVolumeThroughput)
	c.oneOf("volumesEncryption", in.VolumesEncryption, api.EncryptionNone, api.EncryptionDefaultKey, api.EncryptionTenant, api.EncryptionCustom)
	if in.VolumesEncryption == api.EncryptionCustom {
		if c.required("volumesEncryptionKey", in.VolumesEncryptionKey) {
			c.match("volumesEncryptionKey", in.VolumesEncryptionKey, reKMSKey, "a KMS key id, ARN or alias")
		}
	} else if in.VolumesEncryptionKey != "" {
		c.fail("volumesEncryptionKey", "is only used when volumesEncryption is CUSTOM")
	}

	c.rangeInt("awsRootVolumeSizeGB", in.AWSRootVolumeSizeGB, 8, 16384)
	if in.AWSRootVolumeType != "" {
		c.oneOf("awsRootVolumeType", in.AWSRootVolumeType, volumeTypes...)
	}
	checkIOPS(&c, "awsRootVolumeIOPS", in.AWSRootVolumeType, in.AWSRootVolumeIOPS)

	c.cloudTags("cloudTags", in.CloudTags)
	c.fmTags("fmTags", in.FMTags)

	c.rangeInt("automatedSnapshotPeriod", in.AutomatedSnapshotPeriod, 1, 24*365)
	c.rangeInt("automatedSnapshotRetention", in.AutomatedSnapshotRetention, 0, 1000)
	checkCertificatePEM(&c, "sslCertificatePEM", in.SSLCertificatePEM)
	c.match("awsElasticIPAllocationId", in.AWSElasticIPAllocationID, reEIPAlloc, "an Elastic IP allocation id (eipalloc-…)")
	if in.AWSElasticIPAllocationID != "" && !in.AWSAssignElasticIP {
		c.fail("awsElasticIPAllocationId", "is set but awsAssignElasticIP is false")
	}
	return c.err(kindInstance)
}

// checkIOPS applies EBS's IOPS rules for a volume type.
func checkIOPS(c *checker, field, volumeType string, iops *int) {
	switch volumeType {
	case "gp3":
		c.rangeInt(field, iops, 3000, 16000)
	case "io1":
		if iops == nil {
			c.fail(field, "is required for io1 volumes")
		}
		c.rangeInt(field, iops, 100, 64000)
	case "io2":
		if iops == nil {
			c.fail(field, "is required for io2 volumes")
		}
		c.rangeInt(field, iops, 100, 256000)
	default:
		if iops != nil {
			c.fail(field, "can only be set for gp3, io1 and io2 volumes")
		}
	}
}

// checkThroughput checks a gp3 volume's throughput (MiB/s): 125 to 1000,
// and at most a quarter of its IOPS (3000 when not set), as EBS allows.
func checkThroughput(c *checker, field, volumeType string, iops, throughput *int) {
	if throughput == nil {
		return
	}
	if volumeType != "gp3" {
		c.fail(field, "can only be set for gp3 volumes")
		return
	}
	c.rangeInt(field, throughput, 125, 1000)
	ops := 3000
	if iops != nil {
		ops = *iops
	}
	if *throughput > ops/4 {
		c.fail(field, "%d MiB/s is more than a gp3 volume of %d IOPS allows (%d MiB/s: raise dataVolumeIOPS)", *throughput, ops, ops/4)
	}
}

// checkCertificatePEM accepts PEM text holding at least one parseable
// certificate, optionally followed by its private key.
func checkCertificatePEM(c *checker, field, text string) {
	if strings.TrimSpace(text) == "" {
		return
	}
	rest := []byte(text)
	certs := 0
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		switch {
		case b.Type == "CERTIFICATE":
			if _, err := x509.ParseCertificate(b.Bytes); err != nil {
				c.fail(field, "certificate %d cannot be parsed: %v", certs+1, err)
				return
			}
			certs++
		case strings.HasSuffix(b.Type, "PRIVATE KEY"):
		default:
			c.fail(field, "holds a PEM block of type %q; only certificates and a private key are allowed", b.Type)
			return
		}
	}
	if certs == 0 {
		c.fail(field, "holds no PEM certificate")
	}
	if strings.TrimSpace(string(rest)) != "" {
		c.fail(field, "has text that is not PEM")
	}
}
