package ec2

import (
	"encoding/json"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// TestThePolicyGrantsEveryCall: the IAM policy docs/ec2.md gives, ready to
// attach, grants exactly what the backend calls: every method of the two
// small interfaces every EC2, Route53 and ELB call goes through (a call added
// to the code is a method added there, and a missing grant fails this
// test), sts:AssumeRole (the role of a cloud account or the tenant's
// credentials, through the STS credential provider), and what RunInstances
// and EBS need beside (iam:PassRole for the instance profiles, KMS for
// volumes encrypted with a customer key; iam:CreateServiceLinkedRole,
// with which an account's first load balancer makes ELB's role;
// elasticloadbalancing:AddTags, which tagging on create needs).
func TestThePolicyGrantsEveryCall(t *testing.T) {
	want := []string{"iam:PassRole", "iam:CreateServiceLinkedRole", "elasticloadbalancing:AddTags", "sts:AssumeRole", "kms:CreateGrant", "kms:GenerateDataKey*", "kms:Decrypt"}
	for prefix, api := range map[string]reflect.Type{
		"ec2:":                  reflect.TypeFor[ec2API](),
		"route53:":              reflect.TypeFor[dnsAPI](),
		"elasticloadbalancing:": reflect.TypeFor[elbAPI](),
	} {
		for i := range api.NumMethod() {
			want = append(want, prefix+api.Method(i).Name)
		}
	}
	src, err := os.ReadFile("aws.go")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(src), "stscreds.NewAssumeRoleProvider") {
		t.Fatal("the backend no longer assumes roles through stscreds: sts:AssumeRole may not be needed")
	}

	doc, err := os.ReadFile("../../docs/ec2.md")
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(doc), "### The IAM policy")
	if !ok {
		t.Fatal("docs/ec2.md has no section \"The IAM policy\"")
	}
	_, block, ok := strings.Cut(after, "```json\n")
	block, _, ok2 := strings.Cut(block, "```")
	if !ok || !ok2 {
		t.Fatal("the IAM policy section has no JSON block")
	}
	var policy struct {
		Version   string
		Statement []struct {
			Effect   string
			Action   []string
			Resource any
		}
	}
	if err := json.Unmarshal([]byte(block), &policy); err != nil {
		t.Fatalf("the policy is not JSON: %v", err)
	}
	var got []string
	for _, st := range policy.Statement {
		if st.Effect != "Allow" || st.Resource == nil {
			t.Fatalf("a statement that grants nothing: %+v", st)
		}
		got = append(got, st.Action...)
	}
	slices.Sort(want)
	slices.Sort(got)
	if policy.Version != "2012-10-17" || !slices.Equal(got, want) {
		t.Fatalf("the policy grants\n%v\nthe code needs\n%v", got, want)
	}
}
