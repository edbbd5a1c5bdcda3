package cli

import (
	"flag"
	"net/url"
)

var accountResource = &resource{
	command: "account", kind: "cloud account", path: "/cloud-accounts",
	columns: []column{field("ID", "id"), field("LABEL", "label"), field("MODE", "awsAuthenticationMode"),
		field("ROLE", "awsIAMRoleARN"), field("EXTERNAL ID", "awsExternalId"), field("KEY", "awsAccessKeyId"), field("NETWORKS", "nbNetworks")},
	fields: []objField{
		{"label", "label", "string", "label (unique)"},
		{"description", "description", "string", "description"},
		{"mode", "awsAuthenticationMode", "string", "DEFAULT_INSTANCE_CREDENTIALS (the provisioner's own), IAM_ROLE or KEYPAIR"},
		{"role-arn", "awsIAMRoleARN", "string", "IAM role ARN to assume (IAM_ROLE; FM shows the external id to require in its trust policy)"},
		// The secret comes in --file ({"awsSecretAccessKey": …}), never on
		// a command line, which other users of the machine can read.
		{"access-key-id", "awsAccessKeyId", "string", `access key id (KEYPAIR; the secret goes in --file, the whole object with "awsSecretAccessKey")`},
	},
}

var networkResource = &resource{
	command: "network", kind: "virtual network", path: "/virtual-networks",
	columns: []column{field("ID", "id"), field("LABEL", "label"), field("VPC", "awsVpcId"), field("SUBNET", "awsSubnetId"),
		field("REGION", "awsRegion"), field("DNS", "dnsStrategy"), field("HTTPS", "httpsStrategy")},
	fields: []objField{
		{"label", "label", "string", "label (unique)"},
		{"vpc", "awsVpcId", "string", "VPC id (create only)"},
		{"subnet", "awsSubnetId", "string", "subnet id (create only)"},
		{"second-subnet", "awsSecondSubnetId", "string", "second subnet id (can be added once)"},
		{"region", "awsRegion", "string", "AWS region (create only)"},
		{"account", "accountId", "string", "cloud account the provisioner acts as for the network's instances (create only)"},
		{"auto-security-groups", "awsAutoCreateSecurityGroups", "bool", "let FM create the security groups"},
		{"security-groups", "awsSecurityGroups", "list", "comma-separated security group ids (at most 5; needs --auto-security-groups=false)"},
		{"public-ip", "awsAssignPublicIP", "bool", "give instances a public IP"},
		{"internet-access", "internetAccessMode", "string", "YES, NO or EGRESS_ONLY"},
		{"dns-strategy", "dnsStrategy", "string", "NONE or VN_SPECIFIC_CLOUD_DNS_SERVICE"},
		{"private-zone", "awsRoute53PrivateIPZoneId", "string", "Route53 private hosted zone id"},
		{"public-zone", "awsRoute53PublicIPZoneId", "string", "Route53 public hosted zone id"},
		{"https-strategy", "httpsStrategy", "string", "NONE, SELF_SIGNED, CUSTOM_CERTIFICATE or LETSENCRYPT"},
		{"http-strategy", "httpStrategy", "string", "DISABLE or REDIRECT"},
		{"contact-mail", "contactMail", "string", "contact e-mail for Let's Encrypt"},
		{"tags", "cloudTags", "map", "cloud tags, key=value,key=value"},
	},
	createQuery: func(fs *flag.FlagSet) func() url.Values {
		def := fs.Bool("default", false, "use FM's own VPC and subnet (useDefaultValues=True)")
		return func() url.Values {
			v := "False"
			if *def {
				v = "True"
			}
			return url.Values{"useDefaultValues": {v}}
		}
	},
}

var templateResource = &resource{
	command: "template", kind: "instance settings template", path: "/instance-settings-templates",
	columns: []column{field("ID", "id"), field("LABEL", "label"), field("KEY PAIR", "awsKeyPairName"),
		{"SETUP ACTIONS", func(o map[string]any) string {
			a, _ := o["setupActions"].([]any)
			return cellText(float64(len(a)))
		}}},
	fields: []objField{
		{"label", "label", "string", "label (unique)"},
		{"key-pair", "awsKeyPairName", "string", "EC2 key pair name"},
		{"startup-profile", "startupInstanceProfileArn", "string", "instance profile ARN used while starting"},
		{"runtime-profile", "runtimeInstanceProfileArn", "string", "instance profile ARN used by DSS"},
		{"restrict-metadata", "restrictAwsMetadataServerAccess", "bool", "require IMDSv2"},
	},
}

var instanceResource = &resource{
	command: "instance", kind: "instance", path: "/instances",
	columns: instanceColumns,
	fields: []objField{
		{"label", "label", "string", "label (unique)"},
		{"description", "description", "string", "description"},
		{"template", "instanceSettingsTemplateId", "string", "template id (create only)"},
		{"network", "virtualNetworkId", "string", "virtual network id (create only)"},
		{"image", "imageId", "string", "image id (see fm image list)"},
		{"node-type", "dssNodeType", "string", "design, automation, deployer or govern (create only)"},
		{"type", "cloudInstanceType", "string", "cloud instance type, e.g. m5.2xlarge"},
		{"volume-type", "dataVolumeType", "string", "data volume type (gp3, gp2, io1, io2, …)"},
		{"volume-size", "dataVolumeSizeGB", "int", "data volume size in GB"},
		{"volume-max-size", "dataVolumeSizeMaxGB", "int", "size in GB the data volume may grow to"},
		{"volume-iops", "dataVolumeIOPS", "int", "data volume IOPS (gp3, io1, io2)"},
		{"volume-throughput", "dataVolumeThroughput", "int", "gp3 data volume throughput, MiB/s (125 to 1000)"},
		{"encryption", "volumesEncryption", "string", "NONE, DEFAULT_KEY, TENANT or CUSTOM"},
		{"encryption-key", "volumesEncryptionKey", "string", "KMS key for CUSTOM encryption"},
		{"tags", "cloudTags", "map", "cloud tags, key=value,key=value"},
		{"fm-tags", "fmTags", "list", "FM tags, comma-separated"},
		{"auto-snapshot", "enableAutomatedSnapshot", "bool", "take snapshots automatically"},
		{"snapshot-period", "automatedSnapshotPeriod", "int", "hours between automated snapshots"},
		{"snapshot-retention", "automatedSnapshotRetention", "int", "automated snapshots kept (0 keeps all)"},
		{"elastic-ip", "awsAssignElasticIP", "bool", "associate an Elastic IP"},
		{"elastic-ip-allocation", "awsElasticIPAllocationId", "string", "Elastic IP allocation id"},
	},
}

var imageResource = &resource{
	command: "image", kind: "image", path: "/images",
	columns: []column{field("ID", "id"), field("LABEL", "label"), field("DSS VERSION", "dssVersion"),
		{"KIT", func(o map[string]any) string {
			k, _ := o["kit"].(map[string]any)
			for _, key := range []string{"object", "path", "url"} {
				if s, ok := k[key].(string); ok && s != "" {
					return key + ":" + s
				}
			}
			return ""
		}}, field("AMIS", "amis")},
	fields: []objField{
		{"id", "id", "string", "image id, e.g. dss-14.0.0-default"},
		{"label", "label", "string", "label (default: DSS <version>)"},
		{"version", "dssVersion", "string", "DSS version"},
		{"kit-path", "kit.path", "string", "kit archive path on the provisioner's machine"},
		{"kit-url", "kit.url", "string", "kit archive URL (needs --kit-sha256)"},
		{"kit-sha256", "kit.sha256", "string", "SHA-256 of the kit archive"},
		{"kit-object", "kit.object", "string", "kit object name in the fm_kits store"},
		{"ami", "amis", "map", "AMI per region, region=ami-…,region=ami-…"},
	},
	aliases: map[string]string{"add": "create", "remove": "delete"},
}
