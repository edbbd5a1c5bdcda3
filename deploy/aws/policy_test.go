package aws

import (
	"bytes"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// docsPolicy is the JSON policy of docs/ec2.md's "The IAM policy", the one
// provisioner/ec2's TestThePolicyGrantsEveryCall holds equal to the code.
func docsPolicy(t *testing.T) []any {
	t.Helper()
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
		t.Fatal("docs/ec2.md's IAM policy section has no JSON block")
	}
	var policy struct {
		Version   string
		Statement []any
	}
	if err := json.Unmarshal([]byte(block), &policy); err != nil {
		t.Fatalf("docs/ec2.md's policy is not JSON: %v", err)
	}
	if policy.Version != "2012-10-17" {
		t.Fatalf("docs/ec2.md's policy has version %q", policy.Version)
	}
	return policy.Statement
}

// statement is a policy statement in one form, whether it was written in
// docs/ec2.md, in the template, or read back from IAM.
type statement struct {
	Sid, Effect string
	Action      []string // sorted
	Resource    []string // sorted, arn:aws: for the template's arn:${AWS::Partition}:
	Condition   string   // as JSON, with sorted keys
}

// partitionSub is the substitution every substituted Resource starts
// with: the template says arn:${AWS::Partition}: where docs/ec2.md says
// arn:aws:. The only other one is the RoleNamePattern parameter, whose
// default, *, is what docs/ec2.md's policy grants.
var partitionSub = regexp.MustCompile(`^arn:\$\{AWS::Partition\}:`)

const roleNamePattern = "${RoleNamePattern}"

func strs(v any, field string) ([]string, error) {
	var out []string
	one := func(v any) error {
		switch x := v.(type) {
		case string:
			out = append(out, x)
		case map[string]any:
			sub, ok := x["Fn::Sub"].(string)
			if len(x) != 1 || !ok || !partitionSub.MatchString(sub) {
				return fmt.Errorf("%s %v: only arn:${AWS::Partition}:… may be substituted", field, x)
			}
			sub = partitionSub.ReplaceAllString(sub, "arn:aws:")
			sub = strings.Replace(sub, ":role/"+roleNamePattern, ":role/*", 1)
			if strings.Contains(sub, "${") {
				return fmt.Errorf("%s %q substitutes more than the partition", field, sub)
			}
			out = append(out, sub)
		default:
			return fmt.Errorf("%s %v (%T)", field, v, v)
		}
		return nil
	}
	if l, ok := v.([]any); ok {
		for _, x := range l {
			if err := one(x); err != nil {
				return nil, err
			}
		}
	} else if err := one(v); err != nil {
		return nil, err
	}
	slices.Sort(out)
	return out, nil
}

func normalise(raw any) (statement, error) {
	m, ok := raw.(map[string]any)
	if !ok {
		return statement{}, fmt.Errorf("a statement that is not an object: %v", raw)
	}
	for k := range m {
		if !slices.Contains([]string{"Sid", "Effect", "Action", "Resource", "Condition"}, k) {
			return statement{}, fmt.Errorf("statement %v has %s, which no statement of docs/ec2.md has", m["Sid"], k)
		}
	}
	var s statement
	s.Sid, _ = m["Sid"].(string)
	s.Effect, _ = m["Effect"].(string)
	var err error
	if s.Action, err = strs(m["Action"], "Action"); err != nil {
		return s, fmt.Errorf("statement %s: %w", s.Sid, err)
	}
	if s.Resource, err = strs(m["Resource"], "Resource"); err != nil {
		return s, fmt.Errorf("statement %s: %w", s.Sid, err)
	}
	if c, ok := m["Condition"]; ok {
		b, _ := json.Marshal(c) // maps marshal with sorted keys
		s.Condition = string(b)
	}
	if s.Sid == "" || s.Effect != "Allow" || len(s.Action) == 0 || len(s.Resource) == 0 {
		return s, fmt.Errorf("statement %+v: every statement is an Allow with a Sid, actions and resources", s)
	}
	return s, nil
}

// comparePolicies says how got's statements differ from want's, matched by
// Sid; nothing when they are the same.
func comparePolicies(want, got []any) []string {
	index := func(name string, raw []any, problems *[]string) map[string]statement {
		out := map[string]statement{}
		for _, r := range raw {
			s, err := normalise(r)
			if err != nil {
				*problems = append(*problems, name+": "+err.Error())
				continue
			}
			if _, dup := out[s.Sid]; dup {
				*problems = append(*problems, fmt.Sprintf("%s: two statements %s", name, s.Sid))
			}
			out[s.Sid] = s
		}
		return out
	}
	var problems []string
	w, g := index("docs/ec2.md", want, &problems), index("the template", got, &problems)
	for sid, ws := range w {
		gs, ok := g[sid]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("statement %s of docs/ec2.md is not in the template", sid))
		case !reflect.DeepEqual(ws, gs):
			extra, missing := diff(gs.Action, ws.Action), diff(ws.Action, gs.Action)
			problems = append(problems, fmt.Sprintf("statement %s differs: docs/ec2.md\n  %+v\nthe template\n  %+v\n(actions the template has more: %v, less: %v)", sid, ws, gs, extra, missing))
		}
	}
	for sid := range g {
		if _, ok := w[sid]; !ok {
			problems = append(problems, fmt.Sprintf("statement %s of the template is not in docs/ec2.md", sid))
		}
	}
	slices.Sort(problems)
	return problems
}

// diff is what a has that b has not.
func diff(a, b []string) []string {
	var out []string
	for _, x := range a {
		if !slices.Contains(b, x) {
			out = append(out, x)
		}
	}
	return out
}

// s3Actions are the S3 calls of provisioner/archive/s3.go, read from its
// s3API interface (every S3 call of the store goes through it).
func s3Actions(t *testing.T) []string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), "../../provisioner/archive/s3.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	ast.Inspect(f, func(n ast.Node) bool {
		ts, ok := n.(*ast.TypeSpec)
		if !ok || ts.Name.Name != "s3API" {
			return true
		}
		for _, m := range ts.Type.(*ast.InterfaceType).Methods.List {
			for _, name := range m.Names {
				actions = append(actions, "s3:"+name.Name)
			}
		}
		return false
	})
	if len(actions) == 0 {
		t.Fatal("provisioner/archive/s3.go has no s3API interface: what does the S3 store call?")
	}
	slices.Sort(actions)
	return actions
}

// fmStatements are the statements of FM's role's own policy, after checking
// that the role has no other grant than it and the snapshot bucket's.
func fmStatements(t *testing.T, tmpl map[string]any) []any {
	t.Helper()
	role := get(t, tmpl, "Resources", "Role").(map[string]any)
	if role["Type"] != "AWS::IAM::Role" {
		t.Fatalf("Role is a %v", role["Type"])
	}
	props := get(t, role, "Properties").(map[string]any)
	for k := range props {
		if !slices.Contains([]string{"Description", "AssumeRolePolicyDocument", "Policies", "Tags"}, k) {
			t.Errorf("FM's role has %s: its grants are its one inline policy, and the snapshot bucket's", k)
		}
	}
	trust, _ := json.Marshal(get(t, props, "AssumeRolePolicyDocument", "Statement"))
	if want := `[{"Action":"sts:AssumeRole","Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"}}]`; string(trust) != want {
		t.Errorf("FM's role is assumed by\n%s\nwant only EC2's\n%s", trust, want)
	}
	policies := get(t, props, "Policies").([]any)
	if len(policies) != 1 {
		t.Fatalf("FM's role has %d inline policies, want 1", len(policies))
	}
	if v := get(t, policies[0], "PolicyDocument", "Version"); v != "2012-10-17" {
		t.Errorf("FM's policy has version %v", v)
	}
	// Whatever else names the role could grant it more.
	for name, res := range get(t, tmpl, "Resources").(map[string]any) {
		b, _ := json.Marshal(res)
		if name != "Role" && (bytes.Contains(b, []byte(`{"Ref":"Role"}`)) || bytes.Contains(b, []byte(`"Fn::GetAtt":["Role"`))) &&
			!slices.Contains([]string{"InstanceProfile", "SnapshotBucketPolicy"}, name) {
			t.Errorf("resource %s names FM's role: only its instance profile and the snapshot bucket's policy may", name)
		}
	}
	return get(t, policies[0], "PolicyDocument", "Statement").([]any)
}

// TestTheRoleGrantsWhatTheCodeCalls: FM's role holds docs/ec2.md's policy,
// statement for statement (docs/ec2.md's is held equal to the EC2
// backend's calls by provisioner/ec2's TestThePolicyGrantsEveryCall), and,
// only when SnapshotBucket is given, the S3 calls of the snapshot store on
// that bucket's objects. Nothing else.
func TestTheRoleGrantsWhatTheCodeCalls(t *testing.T) {
	t.Parallel()
	tmpl := loadTemplate(t)
	if problems := comparePolicies(docsPolicy(t), fmStatements(t, tmpl)); len(problems) > 0 {
		t.Errorf("FM's role in %s is not docs/ec2.md's policy:\n%s", templatePath, strings.Join(problems, "\n"))
	}
	// The comparison takes role/${RoleNamePattern} as docs/ec2.md's
	// role/*: so is the parameter's default.
	if d := get(t, tmpl, "Parameters", "RoleNamePattern", "Default"); d != "*" {
		t.Errorf("RoleNamePattern's default is %v, not *", d)
	}

	bucket := get(t, tmpl, "Resources", "SnapshotBucketPolicy").(map[string]any)
	if bucket["Type"] != "AWS::IAM::Policy" || bucket["Condition"] != "HasSnapshotBucket" {
		t.Errorf("SnapshotBucketPolicy is a %v under condition %v, want an AWS::IAM::Policy under HasSnapshotBucket", bucket["Type"], bucket["Condition"])
	}
	cond, _ := json.Marshal(get(t, tmpl, "Conditions", "HasSnapshotBucket"))
	if want := `{"Fn::Not":[{"Fn::Equals":[{"Ref":"SnapshotBucket"},""]}]}`; string(cond) != want {
		t.Errorf("HasSnapshotBucket is %s, want %s", cond, want)
	}
	roles, _ := json.Marshal(get(t, bucket, "Properties", "Roles"))
	if string(roles) != `[{"Ref":"Role"}]` {
		t.Errorf("SnapshotBucketPolicy is given to %s, want FM's role alone", roles)
	}
	st := get(t, bucket, "Properties", "PolicyDocument", "Statement").([]any)
	if len(st) != 1 {
		t.Fatalf("SnapshotBucketPolicy has %d statements, want 1", len(st))
	}
	m := st[0].(map[string]any)
	var actions []string
	for _, a := range m["Action"].([]any) {
		actions = append(actions, a.(string))
	}
	slices.Sort(actions)
	res, _ := json.Marshal(m["Resource"])
	if want := s3Actions(t); !slices.Equal(actions, want) || m["Effect"] != "Allow" || m["Condition"] != nil ||
		string(res) != `{"Fn::Sub":"arn:${AWS::Partition}:s3:::${SnapshotBucket}/*"}` {
		t.Errorf("the snapshot bucket's statement is %v; want Allow %v on arn:${AWS::Partition}:s3:::${SnapshotBucket}/*, no condition", m, want)
	}
}

// TestComparePoliciesSeesADifference: the comparison above fails on what
// it must: a call added to the code (so to docs/ec2.md) and not to the
// template, a grant the template has more, a condition or a resource that
// differs.
func TestComparePoliciesSeesADifference(t *testing.T) {
	t.Parallel()
	tmpl := loadTemplate(t)
	docs, own := docsPolicy(t), fmStatements(t, tmpl)
	clone := func(v []any) []any {
		b, _ := json.Marshal(v)
		var c []any
		_ = json.Unmarshal(b, &c)
		return c
	}
	stmt := func(p []any, sid string) map[string]any {
		for _, s := range p {
			if s.(map[string]any)["Sid"] == sid {
				return s.(map[string]any)
			}
		}
		t.Fatalf("no statement %s", sid)
		return nil
	}
	for _, tc := range []struct {
		name   string
		mutate func(docs, own []any) ([]any, []any)
		want   string // a regular expression
	}{
		{"a call added to the code", func(d, o []any) ([]any, []any) {
			s := stmt(d, "FleetManagerMachines")
			s["Action"] = append(s["Action"].([]any), "ec2:CallAddedByThisTest")
			return d, o
		}, `less: \[[^]]*ec2:CallAddedByThisTest`},
		{"a grant the template has more", func(d, o []any) ([]any, []any) {
			s := stmt(o, "FleetManagerLoadBalancers")
			s["Action"] = append(s["Action"].([]any), "elasticloadbalancing:*")
			return d, o
		}, `more: \[[^]]*elasticloadbalancing:\*`},
		{"a statement the template has more", func(d, o []any) ([]any, []any) {
			return d, append(o, map[string]any{"Sid": "Extra", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*"})
		}, `statement Extra of the template is not in docs/ec2.md`},
		{"a condition dropped", func(d, o []any) ([]any, []any) {
			delete(stmt(o, "FleetManagerInstanceProfiles"), "Condition")
			return d, o
		}, `statement FleetManagerInstanceProfiles differs`},
		{"a resource widened", func(d, o []any) ([]any, []any) {
			stmt(o, "FleetManagerCloudAccounts")["Resource"] = "*"
			return d, o
		}, `statement FleetManagerCloudAccounts differs`},
		{"another substitution", func(d, o []any) ([]any, []any) {
			stmt(o, "FleetManagerCloudAccounts")["Resource"] = map[string]any{"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/*"}
			return d, o
		}, `substitutes more than the partition`},
		{"a NotAction", func(d, o []any) ([]any, []any) {
			return d, append(o, map[string]any{"Sid": "NotAction", "Effect": "Allow", "NotAction": "iam:*", "Resource": "*"})
		}, `has NotAction`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, o := tc.mutate(clone(docs), clone(own))
			problems := strings.Join(comparePolicies(d, o), "\n")
			if !regexp.MustCompile(tc.want).MatchString(problems) {
				t.Errorf("want a difference saying %q, got:\n%s", tc.want, problems)
			}
		})
	}
}
