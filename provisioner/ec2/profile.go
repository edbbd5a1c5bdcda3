package ec2

import (
	"context"
	"fmt"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

var _ provisioner.RuntimeProfiles = (*Backend)(nil)

// UseRuntimeProfile implements provisioner.RuntimeProfiles: the machine's
// instance profile association is replaced by one of the runtime profile
// (or made, if the machine has none); a machine that has the runtime
// profile already is left as it is. It acts as the identity of the
// instance's last request, as Alive does: after a restart of the
// provisioner, a machine made as another identity waits for the next
// request of its instance.
func (b *Backend) UseRuntimeProfile(ctx context.Context, st protocol.MachineState) error {
	arn := st.Details[protocol.DetailRuntimeProfile]
	if arn == "" || st.MachineID == "" {
		return nil
	}
	b.mu.Lock()
	auth := b.auth[st.Instance]
	b.mu.Unlock()
	if auth == nil && st.Details[detailIdentity] != "" {
		return fmt.Errorf("the identity machine %s was made as is not known since the provisioner started; it will be at the instance's next request", st.MachineID)
	}
	c, _, err := b.connectTo(ctx, b.region(nil, st), auth)
	if err != nil {
		return err
	}
	out, err := c.ec2.DescribeIamInstanceProfileAssociations(ctx, &ec2.DescribeIamInstanceProfileAssociationsInput{Filters: []types.Filter{
		{Name: aws.String("instance-id"), Values: []string{st.MachineID}},
		{Name: aws.String("state"), Values: []string{"associated", "associating"}}}})
	if err != nil {
		return cloudError("look up the instance profile of "+st.MachineID, err)
	}
	for _, a := range out.IamInstanceProfileAssociations {
		if a.IamInstanceProfile != nil && aws.ToString(a.IamInstanceProfile.Arn) == arn {
			return nil
		}
	}
	spec := &types.IamInstanceProfileSpecification{Arn: aws.String(arn)}
	if len(out.IamInstanceProfileAssociations) == 0 {
		_, err = c.ec2.AssociateIamInstanceProfile(ctx, &ec2.AssociateIamInstanceProfileInput{InstanceId: aws.String(st.MachineID), IamInstanceProfile: spec})
	} else {
		_, err = c.ec2.ReplaceIamInstanceProfileAssociation(ctx, &ec2.ReplaceIamInstanceProfileAssociationInput{
			AssociationId: out.IamInstanceProfileAssociations[0].AssociationId, IamInstanceProfile: spec})
	}
	if err != nil {
		return cloudError("give "+st.MachineID+" its runtime instance profile", err)
	}
	return nil
}
