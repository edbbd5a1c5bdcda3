package ec2

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/deploy/cloudinit"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

// findMachines returns the instance's machine made by request (if any, and
// request is set) and its other machines that are not terminated.
func (b *Backend) findMachines(ctx context.Context, c clients, instance, request string) (*types.Instance, []types.Instance, error) {
	var mine *types.Instance
	var others []types.Instance
	pages := ec2.NewDescribeInstancesPaginator(c.ec2, &ec2.DescribeInstancesInput{Filters: []types.Filter{
		tagFilter(TagInstance, instance), tagFilter(TagRole, roleMachine),
		{Name: aws.String("instance-state-name"), Values: []string{"pending", "running", "stopping", "stopped", "shutting-down"}},
	}})
	for pages.HasMorePages() {
		out, err := pages.NextPage(ctx)
		if err != nil {
			return nil, nil, cloudError("look up the instance's machines", err)
		}
		for _, r := range out.Reservations {
			for _, inst := range r.Instances {
				if request != "" && tagValue(inst.Tags, TagRequest) == request && inst.State.Name != types.InstanceStateNameShuttingDown {
					mine = &inst
				} else {
					others = append(others, inst)
				}
			}
		}
	}
	return mine, others, nil
}

func describeInstance(ctx context.Context, c clients, id string) (*types.Instance, error) {
	out, err := c.ec2.DescribeInstances(ctx, &ec2.DescribeInstancesInput{InstanceIds: []string{id}})
	if err != nil {
		return nil, err
	}
	for _, r := range out.Reservations {
		for _, inst := range r.Instances {
			return &inst, nil
		}
	}
	return nil, nil
}

// imdsURL is the instance metadata service, where the agent reads the
// identity document it joins with.
const imdsURL = "http://169.254.169.254"

// runInstance launches the machine: the request's id is its client token
// and its tag, so that a provisioner that dies after this call finds it
// (findMachines) instead of making another.
func (b *Backend) runInstance(ctx context.Context, c clients, req provisioner.Request, pl plan, sgs []string, volumeID string) (*types.Instance, error) {
	spec := req.Spec
	hostnames, err := b.hostnames(ctx, c, req)
	if err != nil {
		return nil, err
	}
	cfg, err := json.MarshalIndent(agent.Config{
		Instance: req.Instance, MachineRequest: req.ID, NATSURL: b.cfg.AgentNATSURL, Join: spec.Join,
		RootDir: "/", DataDir: "/data", PackageManager: "auto", Hostnames: hostnames, IMDSURL: imdsURL,
	}, "", "  ")
	if err != nil {
		return nil, err
	}
	var ca string
	if spec.Join != nil {
		ca = spec.Join.CACert
	}
	ud, err := cloudinit.UserData(cloudinit.Params{Instance: req.Instance, VolumeID: volumeID, DeviceName: dataDevice,
		DownloadURL: spec.Agent.URL, DownloadSHA256: spec.Agent.SHA256, CACert: ca, AgentConfig: cfg})
	if err != nil {
		return nil, protocol.Errorf(protocol.CodeInvalidArgument, "%v", err)
	}
	fmTags := map[string]string{TagInstance: req.Instance, TagRole: roleMachine, TagRequest: req.ID, TagGeneration: generation(req)}
	in := &ec2.RunInstancesInput{
		ImageId: aws.String(pl.ami), InstanceType: types.InstanceType(spec.InstanceType),
		MinCount: aws.Int32(1), MaxCount: aws.Int32(1), ClientToken: aws.String(req.ID),
		UserData: aws.String(base64.StdEncoding.EncodeToString(ud)),
		NetworkInterfaces: []types.InstanceNetworkInterfaceSpecification{{
			DeviceIndex: aws.Int32(0), SubnetId: aws.String(spec.Network.SubnetID), Groups: sgs,
			AssociatePublicIpAddress: aws.Bool(spec.Network.AssignPublicIP && spec.Network.Public()), DeleteOnTermination: aws.Bool(true),
		}},
		TagSpecifications: []types.TagSpecification{
			{ResourceType: types.ResourceTypeInstance, Tags: tagsFor(spec, spec.Label, fmTags)},
			{ResourceType: types.ResourceTypeVolume, Tags: tagsFor(spec, spec.Label+" (OS)", map[string]string{TagInstance: req.Instance, TagRole: "os", TagRequest: req.ID})},
		},
	}
	if spec.Access.KeyPairName != "" {
		in.KeyName = aws.String(spec.Access.KeyPairName)
	}
	// The startup profile, when given, is what the machine boots with;
	// otherwise the runtime one (docs/ec2.md).
	if p := firstSet(spec.Access.StartupInstanceProfileArn, spec.Access.RuntimeInstanceProfileArn); p != "" {
		in.IamInstanceProfile = &types.IamInstanceProfileSpecification{Arn: aws.String(p)}
	}
	if spec.Access.RestrictMetadataAccess {
		// IMDSv2 only, and one hop: containers on the machine cannot reach it.
		in.MetadataOptions = &types.InstanceMetadataOptionsRequest{HttpTokens: types.HttpTokensStateRequired,
			HttpPutResponseHopLimit: aws.Int32(1), HttpEndpoint: types.InstanceMetadataEndpointStateEnabled}
	} else {
		in.MetadataOptions = &types.InstanceMetadataOptionsRequest{HttpTokens: types.HttpTokensStateOptional,
			HttpPutResponseHopLimit: aws.Int32(2), HttpEndpoint: types.InstanceMetadataEndpointStateEnabled}
	}
	// The OS disk holds the agent's NATS credentials and the instance key:
	// encrypted whenever the data volume is, root-volume settings or not.
	if rv := spec.RootVolume; pl.rootDevice != "" && (rv.SizeGB != 0 || rv.Type != "" || rv.IOPS != 0 || spec.DataVolume.Encryption != "") {
		ebs := &types.EbsBlockDevice{DeleteOnTermination: aws.Bool(true)}
		if rv.SizeGB != 0 {
			ebs.VolumeSize = aws.Int32(int32(rv.SizeGB))
		} else if pl.rootSizeGB != 0 {
			ebs.VolumeSize = aws.Int32(pl.rootSizeGB) // the AMI's, said again (some EC2 APIs need it)
		}
		if rv.Type != "" {
			ebs.VolumeType = types.VolumeType(rv.Type)
		}
		if rv.IOPS != 0 {
			ebs.Iops = aws.Int32(int32(rv.IOPS))
		}
		applyEncryption(spec.DataVolume, &ebs.Encrypted, &ebs.KmsKeyId)
		in.BlockDeviceMappings = []types.BlockDeviceMapping{{DeviceName: aws.String(pl.rootDevice), Ebs: ebs}}
	}
	out, err := c.ec2.RunInstances(ctx, in)
	if err != nil {
		return nil, cloudError("launch the machine", err)
	}
	if len(out.Instances) != 1 {
		return nil, protocol.Errorf(protocol.CodeInternal, "RunInstances made %d machines, not 1", len(out.Instances))
	}
	inst := out.Instances[0]
	req.Progress("launch", fmt.Sprintf("machine %s launched (%s, %s)", aws.ToString(inst.InstanceId), spec.InstanceType, pl.ami))
	return &inst, nil
}

func firstSet(v ...string) string {
	for _, s := range v {
		if s != "" {
			return s
		}
	}
	return ""
}

// waitInstance waits for the machine to reach want; a machine that
// terminates on the way fails the wait at once with AWS's reason. That is
// not a failure that passes: a terminated machine never comes back, and
// making the request's machine again would give the same one (its client
// token is the request's id), so retrying until the deadline would only
// delay the answer.
func (b *Backend) waitInstance(ctx context.Context, c clients, req provisioner.Request, id string, want types.InstanceStateName) (*types.Instance, error) {
	var last *types.Instance
	err := b.waitFor(ctx, req, "machine-state", "machine "+id, func() (bool, string, error) {
		inst, err := describeInstance(ctx, c, id)
		if err != nil && !isNotFound(err) {
			return false, "", cloudError("look at machine "+id, err)
		}
		if inst == nil || inst.State == nil {
			// Just launched: EC2 is eventually consistent.
			return false, "unknown", nil
		}
		last = inst
		state := inst.State.Name
		if state == want {
			return true, string(state), nil
		}
		if want != types.InstanceStateNameTerminated && (state == types.InstanceStateNameTerminated || state == types.InstanceStateNameShuttingDown) {
			reason := "no reason given"
			if inst.StateReason != nil {
				reason = aws.ToString(inst.StateReason.Message)
			}
			return false, "", protocol.Errorf(protocol.CodeFailedPrecondition, "machine %s is %s instead of %s (%s); it will not come back: reprovision the instance",
				id, state, want, reason)
		}
		return false, string(state), nil
	})
	return last, err
}

// terminate ends a machine and waits until it is gone, which detaches the
// data volume (attached on its own, it is not deleted with the machine).
func (b *Backend) terminate(ctx context.Context, c clients, req provisioner.Request, id string) error {
	if _, err := c.ec2.TerminateInstances(ctx, &ec2.TerminateInstancesInput{InstanceIds: []string{id}}); err != nil {
		if isNotFound(err) {
			return nil
		}
		return cloudError("terminate machine "+id, err)
	}
	return b.waitFor(ctx, req, "terminate", "machine "+id, func() (bool, string, error) {
		inst, err := describeInstance(ctx, c, id)
		if isNotFound(err) || (err == nil && (inst == nil || inst.State == nil)) {
			return true, "terminated", nil
		}
		if err != nil {
			return false, "", cloudError("look at machine "+id, err)
		}
		return inst.State.Name == types.InstanceStateNameTerminated, string(inst.State.Name), nil
	})
}
