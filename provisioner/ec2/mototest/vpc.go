package mototest

import (
	"context"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
)

// MakeVPC makes a VPC of cidr with one subnet and a route table of its own
// (standing for Fleet Manager's VPC, which networks are peered with), and
// returns their ids.
func MakeVPC(t testing.TB, api *ec2.Client, cidr string) (vpc, subnet, table string) {
	t.Helper()
	ctx := context.Background()
	v, err := api.CreateVpc(ctx, &ec2.CreateVpcInput{CidrBlock: aws.String(cidr)})
	if err != nil {
		t.Fatal(err)
	}
	vpc = aws.ToString(v.Vpc.VpcId)
	s, err := api.CreateSubnet(ctx, &ec2.CreateSubnetInput{VpcId: aws.String(vpc), CidrBlock: aws.String(cidr)})
	if err != nil {
		t.Fatal(err)
	}
	subnet = aws.ToString(s.Subnet.SubnetId)
	rt, err := api.CreateRouteTable(ctx, &ec2.CreateRouteTableInput{VpcId: aws.String(vpc)})
	if err != nil {
		t.Fatal(err)
	}
	table = aws.ToString(rt.RouteTable.RouteTableId)
	if _, err := api.AssociateRouteTable(ctx, &ec2.AssociateRouteTableInput{RouteTableId: aws.String(table), SubnetId: aws.String(subnet)}); err != nil {
		t.Fatal(err)
	}
	return vpc, subnet, table
}
