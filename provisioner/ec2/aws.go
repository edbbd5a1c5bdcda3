package ec2

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/credentials/stscreds"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	elb "github.com/aws/aws-sdk-go-v2/service/elasticloadbalancingv2"
	"github.com/aws/aws-sdk-go-v2/service/route53"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/smithy-go"
	"github.com/fleetmanager/fm/protocol"
)

// ec2API is the part of EC2 the backend calls: the SDK's client, moto
// behind it, or a test double.
type ec2API interface {
	DescribeImages(context.Context, *ec2.DescribeImagesInput, ...func(*ec2.Options)) (*ec2.DescribeImagesOutput, error)
	DescribeInstanceTypes(context.Context, *ec2.DescribeInstanceTypesInput, ...func(*ec2.Options)) (*ec2.DescribeInstanceTypesOutput, error)
	DescribeKeyPairs(context.Context, *ec2.DescribeKeyPairsInput, ...func(*ec2.Options)) (*ec2.DescribeKeyPairsOutput, error)
	DescribeVpcs(context.Context, *ec2.DescribeVpcsInput, ...func(*ec2.Options)) (*ec2.DescribeVpcsOutput, error)
	DescribeSubnets(context.Context, *ec2.DescribeSubnetsInput, ...func(*ec2.Options)) (*ec2.DescribeSubnetsOutput, error)

	DescribeSecurityGroups(context.Context, *ec2.DescribeSecurityGroupsInput, ...func(*ec2.Options)) (*ec2.DescribeSecurityGroupsOutput, error)
	CreateSecurityGroup(context.Context, *ec2.CreateSecurityGroupInput, ...func(*ec2.Options)) (*ec2.CreateSecurityGroupOutput, error)
	AuthorizeSecurityGroupIngress(context.Context, *ec2.AuthorizeSecurityGroupIngressInput, ...func(*ec2.Options)) (*ec2.AuthorizeSecurityGroupIngressOutput, error)
	AuthorizeSecurityGroupEgress(context.Context, *ec2.AuthorizeSecurityGroupEgressInput, ...func(*ec2.Options)) (*ec2.AuthorizeSecurityGroupEgressOutput, error)
	RevokeSecurityGroupIngress(context.Context, *ec2.RevokeSecurityGroupIngressInput, ...func(*ec2.Options)) (*ec2.RevokeSecurityGroupIngressOutput, error)
	RevokeSecurityGroupEgress(context.Context, *ec2.RevokeSecurityGroupEgressInput, ...func(*ec2.Options)) (*ec2.RevokeSecurityGroupEgressOutput, error)
	DescribeIamInstanceProfileAssociations(context.Context, *ec2.DescribeIamInstanceProfileAssociationsInput, ...func(*ec2.Options)) (*ec2.DescribeIamInstanceProfileAssociationsOutput, error)
	AssociateIamInstanceProfile(context.Context, *ec2.AssociateIamInstanceProfileInput, ...func(*ec2.Options)) (*ec2.AssociateIamInstanceProfileOutput, error)
	ReplaceIamInstanceProfileAssociation(context.Context, *ec2.ReplaceIamInstanceProfileAssociationInput, ...func(*ec2.Options)) (*ec2.ReplaceIamInstanceProfileAssociationOutput, error)
	DescribeVpcPeeringConnections(context.Context, *ec2.DescribeVpcPeeringConnectionsInput, ...func(*ec2.Options)) (*ec2.DescribeVpcPeeringConnectionsOutput, error)
	CreateVpcPeeringConnection(context.Context, *ec2.CreateVpcPeeringConnectionInput, ...func(*ec2.Options)) (*ec2.CreateVpcPeeringConnectionOutput, error)
	AcceptVpcPeeringConnection(context.Context, *ec2.AcceptVpcPeeringConnectionInput, ...func(*ec2.Options)) (*ec2.AcceptVpcPeeringConnectionOutput, error)
	DescribeRouteTables(context.Context, *ec2.DescribeRouteTablesInput, ...func(*ec2.Options)) (*ec2.DescribeRouteTablesOutput, error)
	CreateRoute(context.Context, *ec2.CreateRouteInput, ...func(*ec2.Options)) (*ec2.CreateRouteOutput, error)
	ReplaceRoute(context.Context, *ec2.ReplaceRouteInput, ...func(*ec2.Options)) (*ec2.ReplaceRouteOutput, error)

	DescribeInstances(context.Context, *ec2.DescribeInstancesInput, ...func(*ec2.Options)) (*ec2.DescribeInstancesOutput, error)
	RunInstances(context.Context, *ec2.RunInstancesInput, ...func(*ec2.Options)) (*ec2.RunInstancesOutput, error)
	StartInstances(context.Context, *ec2.StartInstancesInput, ...func(*ec2.Options)) (*ec2.StartInstancesOutput, error)
	StopInstances(context.Context, *ec2.StopInstancesInput, ...func(*ec2.Options)) (*ec2.StopInstancesOutput, error)
	TerminateInstances(context.Context, *ec2.TerminateInstancesInput, ...func(*ec2.Options)) (*ec2.TerminateInstancesOutput, error)

	DescribeVolumes(context.Context, *ec2.DescribeVolumesInput, ...func(*ec2.Options)) (*ec2.DescribeVolumesOutput, error)
	CreateVolume(context.Context, *ec2.CreateVolumeInput, ...func(*ec2.Options)) (*ec2.CreateVolumeOutput, error)
	AttachVolume(context.Context, *ec2.AttachVolumeInput, ...func(*ec2.Options)) (*ec2.AttachVolumeOutput, error)
	DeleteVolume(context.Context, *ec2.DeleteVolumeInput, ...func(*ec2.Options)) (*ec2.DeleteVolumeOutput, error)
	ModifyVolume(context.Context, *ec2.ModifyVolumeInput, ...func(*ec2.Options)) (*ec2.ModifyVolumeOutput, error)
	DescribeVolumesModifications(context.Context, *ec2.DescribeVolumesModificationsInput, ...func(*ec2.Options)) (*ec2.DescribeVolumesModificationsOutput, error)
	CreateTags(context.Context, *ec2.CreateTagsInput, ...func(*ec2.Options)) (*ec2.CreateTagsOutput, error)

	DescribeSnapshots(context.Context, *ec2.DescribeSnapshotsInput, ...func(*ec2.Options)) (*ec2.DescribeSnapshotsOutput, error)
	CreateSnapshot(context.Context, *ec2.CreateSnapshotInput, ...func(*ec2.Options)) (*ec2.CreateSnapshotOutput, error)
	DeleteSnapshot(context.Context, *ec2.DeleteSnapshotInput, ...func(*ec2.Options)) (*ec2.DeleteSnapshotOutput, error)

	DescribeAddresses(context.Context, *ec2.DescribeAddressesInput, ...func(*ec2.Options)) (*ec2.DescribeAddressesOutput, error)
	AllocateAddress(context.Context, *ec2.AllocateAddressInput, ...func(*ec2.Options)) (*ec2.AllocateAddressOutput, error)
	AssociateAddress(context.Context, *ec2.AssociateAddressInput, ...func(*ec2.Options)) (*ec2.AssociateAddressOutput, error)
	ReleaseAddress(context.Context, *ec2.ReleaseAddressInput, ...func(*ec2.Options)) (*ec2.ReleaseAddressOutput, error)
}

// dnsAPI is the part of Route53 the backend calls.
type dnsAPI interface {
	GetHostedZone(context.Context, *route53.GetHostedZoneInput, ...func(*route53.Options)) (*route53.GetHostedZoneOutput, error)
	ListResourceRecordSets(context.Context, *route53.ListResourceRecordSetsInput, ...func(*route53.Options)) (*route53.ListResourceRecordSetsOutput, error)
	ChangeResourceRecordSets(context.Context, *route53.ChangeResourceRecordSetsInput, ...func(*route53.Options)) (*route53.ChangeResourceRecordSetsOutput, error)
}

var (
	_ ec2API = (*ec2.Client)(nil)
	_ dnsAPI = (*route53.Client)(nil)
)

// clients are the APIs of one region as one identity.
type clients struct {
	ec2 ec2API
	dns dnsAPI
	elb elbAPI
}

// connector makes (and caches) clients per region and identity; tests
// replace it with a double.
type connector func(ctx context.Context, region string, auth *protocol.CloudAuth) (clients, error)

// awsConnector builds SDK clients: the standard credential chain (env,
// shared config, instance profile) for FM's own identity, a role assumed
// with it, or a static key; endpoint, if set, replaces AWS's for every
// service (moto, an AWS-compatible endpoint).
func awsConnector(endpoint string, open func(sealed, where string) (string, error)) connector {
	var mu sync.Mutex
	cache := map[string]clients{}
	return func(ctx context.Context, region string, auth *protocol.CloudAuth) (clients, error) {
		if auth == nil {
			auth = &protocol.CloudAuth{Mode: protocol.CloudAuthSameAsFM}
		}
		var secret string
		switch auth.Mode {
		case protocol.CloudAuthSameAsFM, "", protocol.CloudAuthIAMRole:
		case protocol.CloudAuthKeypair:
			if open == nil {
				return clients{}, protocol.Errorf(protocol.CodeFailedPrecondition,
					"the cloud credentials are a key pair, but this provisioner has no --secret-key-file to open its secret")
			}
			var err error
			if secret, err = open(auth.SealedSecretAccessKey, protocol.SealedCloudSecretPlace); err != nil || secret == "" {
				return clients{}, protocol.Errorf(protocol.CodeFailedPrecondition,
					"the cloud credentials' secret cannot be opened with this provisioner's secret key (is it FM's?)")
			}
		default:
			return clients{}, protocol.Errorf(protocol.CodeInvalidArgument, "cloud authentication mode %q is unknown", auth.Mode)
		}
		// Sealing is randomised, so the cache knows a key pair by a digest of
		// its opened secret.
		digest := sha256.Sum256([]byte(secret))
		key := strings.Join([]string{region, auth.Mode, auth.RoleARN, auth.ExternalID, auth.AccessKeyID, hex.EncodeToString(digest[:])}, "|")
		mu.Lock()
		defer mu.Unlock()
		if c, ok := cache[key]; ok {
			return c, nil
		}
		opts := []func(*config.LoadOptions) error{config.WithRegion(region), config.WithRetryMaxAttempts(10)}
		if endpoint != "" {
			opts = append(opts, config.WithBaseEndpoint(endpoint))
		}
		if auth.Mode == protocol.CloudAuthKeypair {
			opts = append(opts, config.WithCredentialsProvider(credentials.NewStaticCredentialsProvider(auth.AccessKeyID, secret, "")))
		}
		cfg, err := config.LoadDefaultConfig(ctx, opts...)
		if err != nil {
			return clients{}, fmt.Errorf("aws configuration: %w", err)
		}
		if auth.Mode == protocol.CloudAuthIAMRole {
			cfg.Credentials = aws.NewCredentialsCache(stscreds.NewAssumeRoleProvider(sts.NewFromConfig(cfg), auth.RoleARN,
				func(o *stscreds.AssumeRoleOptions) {
					o.RoleSessionName = "fleet-manager"
					if auth.ExternalID != "" {
						o.ExternalID = aws.String(auth.ExternalID)
					}
				}))
		}
		c := clients{ec2: ec2.NewFromConfig(cfg), dns: route53.NewFromConfig(cfg), elb: elb.NewFromConfig(cfg)}
		cache[key] = c
		return c, nil
	}
}

// The AWS error codes the backend tells apart.
var (
	permissionCodes = []string{"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure"}
	notFoundSuffix  = ".NotFound"
)

func apiCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

// serverSide reports whether AWS answered err with a 5xx status.
func serverSide(err error) bool {
	var re *awshttp.ResponseError
	return errors.As(err, &re) && re.HTTPStatusCode() >= 500
}

func isNotFound(err error) bool {
	code := apiCode(err)
	return strings.HasSuffix(code, notFoundSuffix) || code == "NoSuchHostedZone"
}

// iamAction names the IAM action an SDK operation needs ("ec2:RunInstances").
func iamAction(err error) string {
	var oe *smithy.OperationError
	if !errors.As(err, &oe) {
		return ""
	}
	svc := strings.ToLower(strings.ReplaceAll(oe.ServiceID, " ", ""))
	return svc + ":" + oe.OperationName
}

// cloudError turns an AWS error into the operation's error: a refusal
// names the call and the IAM action it needs; an AWS-side failure keeps its
// cause. what says what FM was doing.
func cloudError(what string, err error) error {
	if err == nil {
		return nil
	}
	var pe *protocol.Error
	if errors.As(err, &pe) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	code, action := apiCode(err), iamAction(err)
	var ae smithy.APIError
	msg := err.Error()
	if errors.As(err, &ae) {
		msg = ae.ErrorMessage()
	}
	for _, c := range permissionCodes {
		if code == c {
			return &protocol.Error{Code: protocol.CodePermissionDenied, Message: fmt.Sprintf(
				"%s: AWS refused %s (%s): FM's AWS identity needs the IAM action %s", what, action, code, action)}
		}
	}
	switch {
	case strings.HasPrefix(code, "Invalid") || strings.HasSuffix(code, notFoundSuffix) || code == "MissingParameter" || code == "NoSuchEntity":
		return &protocol.Error{Code: protocol.CodeInvalidArgument, Message: fmt.Sprintf("%s: %s: %s", what, code, msg)}
	case code == "RequestLimitExceeded" || code == "Throttling" || code == "ThrottlingException":
		// Throttled after the SDK's own retries: it passes; the provisioner
		// tries again until the operation's deadline.
		return &protocol.Error{Code: protocol.CodeUnavailable, Message: fmt.Sprintf("%s: %s (throttled): %s", what, code, msg)}
	case strings.HasPrefix(code, "InsufficientInstanceCapacity") ||
		code == "VolumeLimitExceeded" || code == "AddressLimitExceeded" || code == "InstanceLimitExceeded":
		return &protocol.Error{Code: protocol.CodeResourceExhausted, Message: fmt.Sprintf("%s: %s: %s", what, code, msg)}
	case code != "" && serverSide(err):
		// AWS failed on its side (5xx): it may pass.
		return &protocol.Error{Code: protocol.CodeUnavailable, Message: fmt.Sprintf("%s: %s (%s): %s", what, action, code, msg)}
	case code != "":
		// Refused for a reason FM does not know: trying again will not help.
		return &protocol.Error{Code: protocol.CodeFailedPrecondition, Message: fmt.Sprintf("%s: %s (%s): %s", what, action, code, msg)}
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		// AWS out of reach (after the SDK's retries): it may come back.
		return &protocol.Error{Code: protocol.CodeUnavailable, Message: fmt.Sprintf("%s: AWS unreachable: %v", what, err)}
	}
	return fmt.Errorf("%s: %w", what, err)
}
