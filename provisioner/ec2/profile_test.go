package ec2

import (
	"context"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/iam"
	"github.com/fleetmanager/fm/protocol"
)

// TestTheStartupProfileIsSwapped: a machine of a template with a startup
// and a runtime profile boots with the startup one, its record naming the
// runtime one still to give; UseRuntimeProfile replaces the association,
// and asked again (a provisioner that died before recording it) changes
// nothing.
func TestTheStartupProfileIsSwapped(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	startup, err := w.iam.CreateInstanceProfile(ctx, &iam.CreateInstanceProfileInput{InstanceProfileName: aws.String("dss-startup")})
	if err != nil {
		t.Fatal(err)
	}
	spec := w.spec()
	spec.Access.StartupInstanceProfileArn = aws.ToString(startup.InstanceProfile.Arn)
	st, err := w.backend.Reprovision(ctx, w.request("rq-1", protocol.ProvisionReprovision, spec), protocol.MachineState{})
	if err != nil {
		t.Fatalf("reprovision: %v\n%s", err, strings.Join(w.progress, "\n"))
	}
	if st.Details[protocol.DetailRuntimeProfile] != w.instanceProfileArn || st.Details[protocol.DetailInstanceProfile] != spec.Access.StartupInstanceProfileArn ||
		st.Details[protocol.DetailMadeBy] != "rq-1" {
		t.Fatalf("details %v", st.Details)
	}
	profileOf := func() []string {
		t.Helper()
		out, err := w.ec2.DescribeIamInstanceProfileAssociations(ctx, &ec2.DescribeIamInstanceProfileAssociationsInput{})
		if err != nil {
			t.Fatal(err)
		}
		var arns []string
		for _, a := range out.IamInstanceProfileAssociations {
			if aws.ToString(a.InstanceId) == st.MachineID && (a.State == "associated" || a.State == "associating") {
				arns = append(arns, aws.ToString(a.IamInstanceProfile.Arn))
			}
		}
		return arns
	}
	if got := profileOf(); len(got) != 1 || got[0] != spec.Access.StartupInstanceProfileArn {
		t.Fatalf("booted with %v, want the startup profile", got)
	}
	for range 2 {
		if err := w.backend.UseRuntimeProfile(ctx, st); err != nil {
			t.Fatal(err)
		}
		if got := profileOf(); len(got) != 1 || got[0] != w.instanceProfileArn {
			t.Fatalf("after the swap: %v, want the runtime profile %s", got, w.instanceProfileArn)
		}
	}

	// A template with the runtime profile alone has nothing to swap.
	spec.Access.StartupInstanceProfileArn = ""
	st, err = w.backend.Reprovision(ctx, w.request("rq-2", protocol.ProvisionReprovision, spec), st)
	if err != nil {
		t.Fatal(err)
	}
	if _, pending := st.Details[protocol.DetailRuntimeProfile]; pending || st.Details[protocol.DetailInstanceProfile] != w.instanceProfileArn {
		t.Fatalf("details %v", st.Details)
	}
}

// TestAGP3VolumesThroughput: a gp3 data volume is made with the throughput
// asked for; a throughput for another type is refused before anything is
// made.
func TestAGP3VolumesThroughput(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	spec := w.spec()
	spec.DataVolume.Type, spec.DataVolume.IOPS, spec.DataVolume.ThroughputMiBps = "gp2", 0, 250
	if _, err := w.backend.Reprovision(ctx, w.request("rq-0", protocol.ProvisionReprovision, spec), protocol.MachineState{}); protocol.CodeOf(err) != protocol.CodeInvalidArgument ||
		!strings.Contains(err.Error(), "throughput 250") {
		t.Fatalf("err = %v", err)
	}
	if n := len(w.fmInstances(t)); n != 0 {
		t.Fatalf("%d machines made for a refused request", n)
	}
	spec.DataVolume.Type, spec.DataVolume.IOPS = "gp3", 4000
	st, err := w.backend.Reprovision(ctx, w.request("rq-1", protocol.ProvisionReprovision, spec), protocol.MachineState{})
	if err != nil {
		t.Fatalf("reprovision: %v\n%s", err, strings.Join(w.progress, "\n"))
	}
	if v := w.volume(t, st.VolumeID); v.VolumeType != "gp3" || aws.ToInt32(v.Iops) != 4000 || aws.ToInt32(v.Throughput) != 250 {
		t.Fatalf("volume %s: %s, %d IOPS, %d MiB/s", st.VolumeID, v.VolumeType, aws.ToInt32(v.Iops), aws.ToInt32(v.Throughput))
	}
}
