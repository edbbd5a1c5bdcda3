// Package ec2 is the provisioner's EC2 backend: a DSS instance's machine is
// an EC2 instance booted from its image's AMI, with a separate EBS data
// volume that outlives it, the network's security groups, an optional
// elastic IP and Route53 records. The machine's user data (deploy/cloudinit)
// installs fm from the FM server and starts the agent with a single-use join
// token.
//
// Every create is idempotent across a crash: FM tags every resource
// (fm:instance, fm:role, fm:request) and looks them up before creating one,
// and RunInstances carries the provision request's id as its client token.
// All AWS calls go through the small ec2API and dnsAPI interfaces, so the
// same code runs against AWS, the moto server and test doubles.
//
// cmd/fm and tests import it; it imports protocol, provisioner, agent (the
// config file format) and deploy/cloudinit.
package ec2
