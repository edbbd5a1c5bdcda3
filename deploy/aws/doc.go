// Package aws holds what an operator needs to run FM in their own AWS
// account: fm.yaml, a CloudFormation template that starts fm server and
// fm provisioner (EC2 backend) from the fm Debian package on one EC2
// instance, with the IAM role docs/ec2.md's policy describes and an
// encrypted data volume snapshotted daily (docs/deploy-aws.md). It has no
// code and nothing imports it; its tests lint the template with cfn-lint,
// hold its role's policy equal to docs/ec2.md's (itself held equal to the
// calls the code makes), and create the stack on moto.
package aws
