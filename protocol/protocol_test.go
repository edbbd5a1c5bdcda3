package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

var t0 = time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)

// vectors are the canonical messages whose encodings are pinned in testdata/.
// A change to an encoding is a protocol change: see the package doc.
func vectors() map[string]struct {
	msg   Message
	fresh func() Message
} {
	return map[string]struct {
		msg   Message
		fresh func() Message
	}{
		"desired_state": {&DesiredState{
			Instance: "in-7k2m9q4x1c", Generation: 3, NodeType: "design",
			DSS: DSSTarget{ImageID: "dss-14.0.0-standin", Version: "14.0.0", Port: 10000,
				Kit: KitSource{URL: "https://kits.example.com/dss-14.0.0.tar.gz", SHA256: strings.Repeat("ab", 32)}},
			SetupActions: []SetupAction{
				{Type: ActionAddAuthorizedKey, Params: json.RawMessage(`{"sshKey":"ssh-ed25519 AAAA test"}`), Enabled: true},
				{Type: ActionRunAnsibleTasks, Params: json.RawMessage(`{"stage":"after_install","ansibleTasks":"- debug: msg=hi"}`), Enabled: false},
			},
			HeartbeatSeconds: 10,
		}, func() Message { return &DesiredState{} }},
		"command": {&Command{
			ID: "cmd-0001", Instance: "in-7k2m9q4x1c", Kind: CommandResetUserPassword, OpID: "op-42",
			Issued: t0, Params: json.RawMessage(`{"userName":"admin","password":"s3cret"}`),
		}, func() Message { return &Command{} }},
		"event": {&Event{
			ID: "ev-0001", Instance: "in-7k2m9q4x1c", Kind: EventStep, Time: t0, Source: "agent",
			Generation: 3, OpID: "op-42", Step: "install", Status: StatusFailed,
			Message: "installer exited with status 1", Output: "error: disk full",
			Error: &Error{Code: CodeInternal, Message: "install failed"},
		}, func() Message { return &Event{} }},
		"heartbeat": {&Heartbeat{
			Instance: "in-7k2m9q4x1c", Seq: 17, Time: t0, Generation: 3, DSS: DSSRunning, AgentVersion: "0.1.0",
		}, func() Message { return &Heartbeat{} }},
		"attempt_failure": {&AttemptFailure{Replica: "srv-0001", Limiter: "api-by-addr", Key: []byte("192.0.2.7"), At: t0},
			func() Message { return &AttemptFailure{} }},
		"commands_after_request": {&CommandsAfterRequest{After: 57}, func() Message { return &CommandsAfterRequest{} }},
		"commands_after_response": {&CommandsAfterResponse{Commands: []StoredCommand{
			{Seq: 58, Command: json.RawMessage(`{"v":1,"id":"cmd-0001","instance":"in-7k2m9q4x1c","kind":"restart-dss","issued":"2026-11-02T10:00:00Z"}`)},
			{Seq: 61},
		}, More: true}, func() Message { return &CommandsAfterResponse{} }},
		"provision_request": {&ProvisionRequest{
			ID: "op-42-reprovision", Instance: "in-7k2m9q4x1c", Action: ProvisionReprovision, OpID: "op-42", Generation: 3, Issued: t0, Order: 57,
			Spec: &MachineSpec{Label: "analytics", NodeType: "design", ImageID: "dss-14.0.0-default", DSSVersion: "14.0.0",
				AMIs: map[string]string{"eu-west-1": "ami-0abc"}, InstanceType: "m5.2xlarge", BasePort: 10000,
				Network:    NetworkSpec{ID: "vn-1", Region: "eu-west-1", VpcID: "vpc-1", SubnetID: "subnet-1", AutoCreateSecurityGroups: true, AssignPublicIP: true, DNSStrategy: "NONE"},
				Access:     AccessSpec{KeyPairName: "ops", RuntimeInstanceProfileArn: "arn:aws:iam::123456789012:instance-profile/dss", RestrictMetadataAccess: true},
				DataVolume: VolumeSpec{Type: "gp3", SizeGB: 50, MaxSizeGB: 100, Encryption: "DEFAULT_KEY"},
				Tags:       map[string]string{"team": "data"},
				Agent:      &AgentDownload{URL: "https://fm.example.com:10000/download/fm", SHA256: strings.Repeat("ab", 32)}},
			Cloud:        &CloudAuth{Mode: CloudAuthIAMRole, RoleARN: "arn:aws:iam::123456789012:role/fm"},
			Snapshot:     &SnapshotRef{ID: "snap-before-upgrade"},
			FromSnapshot: &SnapshotRef{ID: "snap-1", Store: "object-store", Ref: "in-7k2m9q4x1c/snap-1.tar.gz", SHA256: strings.Repeat("cd", 32), SizeBytes: 1 << 20, VolumeSizeGB: 50},
		}, func() Message { return &ProvisionRequest{} }},
		"snapshot_event": {&Event{
			ID: "op-43-snapshot-ok", Instance: "in-7k2m9q4x1c", Kind: EventSnapshot, Time: t0, Source: "provisioner",
			OpID: "op-43", Step: "snapshot", Status: StatusOK, Message: "snapshot snap-2 done",
			Snapshot: &SnapshotRef{ID: "snap-2", Store: "ebs", Ref: "snap-0123456789abcdef0", VolumeSizeGB: 50, Region: "eu-west-1"},
		}, func() Message { return &Event{} }},
		"grow_volume_request": {&ProvisionRequest{
			ID: "op-44-grow-volume", Instance: "in-7k2m9q4x1c", Action: ProvisionGrowVolume, OpID: "op-44", Issued: t0, VolumeSizeGB: 75,
		}, func() Message { return &ProvisionRequest{} }},
		"machine_state": {&MachineState{
			Instance: "in-7k2m9q4x1c", Backend: "ec2", Status: MachineRunning, Generation: 3, RequestID: "op-42-reprovision",
			Action: ProvisionReprovision, MachineID: "i-0123456789abcdef0", VolumeID: "vol-0abc", VolumeSizeGB: 50,
			PrivateIP: "10.0.1.12", PublicIP: "52.1.2.3", PrivateDNS: "ip-10-0-1-12.eu-west-1.compute.internal",
			Details: map[string]string{"securityGroups": "sg-1,sg-2"}, Updated: t0, Order: 57,
		}, func() Message { return &MachineState{} }},
		"audit_record": {&AuditRecord{
			ID: "au-0001", Time: t0, Tenant: "main", Who: "key:AbC123", Role: "operator", From: "10.0.0.7",
			Action: "GET /api/public/tenants/main/instances/in-7k2m9q4x1c/actions/reprovision", Object: "instances",
			ObjectID: "in-7k2m9q4x1c", Outcome: "ok", Status: 200,
		}, func() Message { return &AuditRecord{} }},
		"command_upgrade_agent": {&Command{
			ID: "op-42-cmd", Instance: "in-7k2m9q4x1c", Kind: CommandUpgradeAgent, OpID: "op-42", Issued: t0, Expires: t0.Add(30 * time.Minute),
			Params: func() json.RawMessage {
				b, _ := json.Marshal(UpgradeAgentParams{URL: "https://fm.example.com:10000/download/fm",
					SHA256: "6f55844db972ba9922fcd1dcfcff0e1aeb01b210e0a5bc1811c0d72176ef4ecf", ReportWithinSeconds: 300})
				return b
			}(),
		}, func() Message { return &Command{} }},
		"agent_status_upgradable": {&AgentStatus{
			Instance: "in-7k2m9q4x1c", Time: t0, AgentVersion: "1.2.0", AgentSHA256: "6f55844db972ba9922fcd1dcfcff0e1aeb01b210e0a5bc1811c0d72176ef4ecf",
			Generation: 3, Target: 3, Phase: PhaseReady, DSS: DSSStatus{State: DSSRunning, Version: "14.0.0", NodeType: "design", Port: 10000},
		}, func() Message { return &AgentStatus{} }},
		"agent_status": {&AgentStatus{
			Instance: "in-7k2m9q4x1c", Time: t0, AgentVersion: "0.1.0", Generation: 3, Target: 3, Phase: PhaseReady,
			DSS:     DSSStatus{State: DSSRunning, Version: "14.0.0", NodeType: "design", Port: 10000},
			Machine: MachineFacts{DataVolumeBytes: 50 << 30, DataVolumeUsedBytes: 5 << 30, Load1: 0.25, MemTotalBytes: 8 << 30, MemAvailableBytes: 6 << 30, UptimeSeconds: 3600},
		}, func() Message { return &AgentStatus{} }},
		"desired_state_https": {&DesiredState{
			Instance: "in-7k2m9q4x1c", Generation: 4, NodeType: "design",
			DSS: DSSTarget{ImageID: "dss-14.0.0-standin", Version: "14.0.0", Port: 10000,
				Kit: KitSource{Object: "dss-14.0.0.tar.gz"},
				HTTPS: &HTTPSTarget{Strategy: HTTPSLetsEncrypt, Port: 443, HTTPPort: 80, Redirect: true,
					ACME: &ACMETarget{DirectoryURL: "https://acme-v02.api.letsencrypt.org/directory", Email: "ops@example.com"}},
				AWSCredentials: &AWSCredentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SealedSecretAccessKey: "fmsealed2:c2VjcmV0"},
				Tools: map[string]ToolSource{
					"kubectl": {URL: "https://dl.k8s.io/release/v1.31.4/bin/linux/amd64/kubectl", SHA256: "298e19e9c6c17199011404278f0ff8168a7eca4217edad9097af577023a5620f"},
					"eksctl":  {URL: "https://github.com/eksctl-io/eksctl/releases/download/v0.199.0/eksctl_Linux_amd64.tar.gz", SHA256: "0e7c3e1a7a1dd1a1c3f2b9b0a9a1b6e2d1f6e3c5a4b7d8e9f0a1b2c3d4e5f6a7", Binary: "eksctl"}}},
			SetupActions: []SetupAction{}, HeartbeatSeconds: 10,
		}, func() Message { return &DesiredState{} }},
		"agent_status_https": {&AgentStatus{
			Instance: "in-7k2m9q4x1c", Time: t0, AgentVersion: "0.1.0", Generation: 4, Target: 4, Phase: PhaseReady,
			DSS: DSSStatus{State: DSSRunning, Version: "14.0.0", NodeType: "design", Port: 10000,
				HTTPS: &HTTPSStatus{Strategy: HTTPSSelfSigned, Port: 443, Serving: true, Certificate: &CertificateInfo{
					Source: CertificateSelfSigned, Subject: "CN=in-7k2m9q4x1c", Issuer: "CN=in-7k2m9q4x1c",
					DNSNames: []string{"in-7k2m9q4x1c.dss.example.com"}, NotAfter: "2027-11-02T10:00:00Z"}}},
		}, func() Message { return &AgentStatus{} }},
	}
}

func TestGoldenVectors(t *testing.T) {
	for name, v := range vectors() {
		t.Run(name, func(t *testing.T) {
			got, err := Encode(v.msg)
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			var pretty bytes.Buffer
			if err := json.Indent(&pretty, got, "", "  "); err != nil {
				t.Fatal(err)
			}
			pretty.WriteByte('\n')
			path := filepath.Join("testdata", name+".json")
			if *update {
				if err := os.WriteFile(path, pretty.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("read golden file (run with -update to create it): %v", err)
			}
			if !bytes.Equal(pretty.Bytes(), want) {
				t.Errorf("encoding changed; a wire change needs a protocol decision (see doc.go).\ngot:\n%s\nwant:\n%s", pretty.Bytes(), want)
			}
			// The golden bytes decode back to the same value.
			back := v.fresh()
			if err := Decode(want, back); err != nil {
				t.Fatalf("Decode golden: %v", err)
			}
			if !reflect.DeepEqual(normalize(t, back), normalize(t, v.msg)) {
				t.Errorf("round trip differs:\n got %+v\nwant %+v", back, v.msg)
			}
		})
	}
}

// normalize re-encodes a message so that RawMessage whitespace does not matter.
func normalize(t *testing.T, m Message) any {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	var out any
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestDecodeRejects(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  error
	}{
		{"not json", `{"v":1,`, ErrMalformed},
		{"array", `[1,2]`, ErrMalformed},
		{"null", `null`, ErrMalformed},
		{"no version", `{"instance":"in-1","seq":1}`, ErrMalformed},
		{"version zero", `{"v":0,"instance":"in-1"}`, ErrMalformed},
		{"future version", `{"v":99,"instance":"in-1"}`, ErrUnsupportedVersion},
		{"negative version", `{"v":-1,"instance":"in-1"}`, ErrUnsupportedVersion},
		{"future version with other shape", `{"v":2,"instance":{"id":"in-1"}}`, ErrUnsupportedVersion},
		{"wrong field type", `{"v":1,"instance":"in-1","seq":"one"}`, ErrMalformed},
		{"bad instance token", `{"v":1,"instance":"in.1"}`, ErrMalformed},
		{"empty instance", `{"v":1,"instance":""}`, ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := Decode([]byte(tc.input), &Heartbeat{})
			if !errors.Is(err, tc.want) {
				t.Fatalf("Decode(%s) = %v, want %v", tc.input, err, tc.want)
			}
		})
	}
}

func TestValidateRules(t *testing.T) {
	good := func() *DesiredState {
		d := vectors()["desired_state"].msg.(*DesiredState)
		return d
	}
	tests := []struct {
		name   string
		mutate func(*DesiredState)
	}{
		{"generation zero", func(d *DesiredState) { d.Generation = 0 }},
		{"no version", func(d *DesiredState) { d.DSS.Version = "" }},
		{"port zero", func(d *DesiredState) { d.DSS.Port = 0 }},
		{"port too big", func(d *DesiredState) { d.DSS.Port = 70000 }},
		{"two kit sources", func(d *DesiredState) { d.DSS.Kit.Path = "/tmp/kit" }},
		{"no kit source", func(d *DesiredState) { d.DSS.Kit = KitSource{} }},
		{"url without digest", func(d *DesiredState) { d.DSS.Kit.SHA256 = "" }},
		{"action without type", func(d *DesiredState) { d.SetupActions[0].Type = "" }},
		{"https strategy unknown", func(d *DesiredState) { d.DSS.HTTPS = &HTTPSTarget{Strategy: "NONE", Port: 443} }},
		{"https port zero", func(d *DesiredState) { d.DSS.HTTPS = &HTTPSTarget{Strategy: HTTPSSelfSigned} }},
		{"https on DSS's port", func(d *DesiredState) { d.DSS.HTTPS = &HTTPSTarget{Strategy: HTTPSSelfSigned, Port: 10000} }},
		{"http on the https port", func(d *DesiredState) {
			d.DSS.HTTPS = &HTTPSTarget{Strategy: HTTPSSelfSigned, Port: 443, HTTPPort: 443}
		}},
		{"redirect without a port", func(d *DesiredState) {
			d.DSS.HTTPS = &HTTPSTarget{Strategy: HTTPSSelfSigned, Port: 443, Redirect: true}
		}},
		{"custom without a certificate", func(d *DesiredState) { d.DSS.HTTPS = &HTTPSTarget{Strategy: HTTPSCustomCertificate, Port: 443} }},
		{"acme without a directory", func(d *DesiredState) {
			d.DSS.HTTPS = &HTTPSTarget{Strategy: HTTPSLetsEncrypt, Port: 443, HTTPPort: 80}
		}},
		{"acme over plain http", func(d *DesiredState) {
			d.DSS.HTTPS = &HTTPSTarget{Strategy: HTTPSLetsEncrypt, Port: 443, HTTPPort: 80, ACME: &ACMETarget{DirectoryURL: "http://acme.example.com/dir"}}
		}},
		{"aws credentials without a key id", func(d *DesiredState) { d.DSS.AWSCredentials = &AWSCredentials{SecretAccessKey: awsSecret} }},
		{"aws credentials without a secret", func(d *DesiredState) { d.DSS.AWSCredentials = &AWSCredentials{AccessKeyID: awsKeyID} }},
		{"aws credentials with both secrets", func(d *DesiredState) {
			d.DSS.AWSCredentials = &AWSCredentials{AccessKeyID: awsKeyID, SecretAccessKey: awsSecret, SealedSecretAccessKey: "fmsealed2:x"}
		}},
		{"aws key id breaking the file", func(d *DesiredState) {
			d.DSS.AWSCredentials = &AWSCredentials{AccessKeyID: awsKeyID + "\n[evil]", SecretAccessKey: awsSecret}
		}},
		{"aws key id with a comment", func(d *DesiredState) {
			d.DSS.AWSCredentials = &AWSCredentials{AccessKeyID: awsKeyID + "#x", SecretAccessKey: awsSecret}
		}},
		{"aws secret breaking the file", func(d *DesiredState) {
			d.DSS.AWSCredentials = &AWSCredentials{AccessKeyID: awsKeyID, SecretAccessKey: awsSecret + "\ncredential_process = sh"}
		}},
		{"aws secret with spaces", func(d *DesiredState) {
			d.DSS.AWSCredentials = &AWSCredentials{AccessKeyID: awsKeyID, SecretAccessKey: " " + awsSecret}
		}},
		{"acme without an http port", func(d *DesiredState) {
			d.DSS.HTTPS = &HTTPSTarget{Strategy: HTTPSLetsEncrypt, Port: 443, ACME: &ACMETarget{DirectoryURL: "https://acme.example.com/dir"}}
		}},
	}
	if err := good().Validate(); err != nil {
		t.Fatalf("the canonical vector must validate: %v", err)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := good()
			tc.mutate(d)
			if _, err := Encode(d); err == nil {
				t.Fatal("Encode accepted an invalid message")
			}
		})
	}
}

func TestEventNeedsErrorWhenFailed(t *testing.T) {
	e := &Event{ID: "e1", Instance: "i1", Kind: EventStep, Status: StatusFailed}
	if err := e.Validate(); err == nil {
		t.Fatal("a failed event without an error was accepted")
	}
	e.Error = Errorf(CodeInternal, "boom")
	if err := e.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestSubjects(t *testing.T) {
	tests := []struct{ got, want string }{
		{DesiredSubject("in-1"), "fm.desired.in-1"},
		{HeartbeatSubject("in-1"), "fm.hb.in-1"},
		{CommandSubject("in-1", "c1"), "fm.cmd.in-1.c1"},
		{CommandFilter("in-1"), "fm.cmd.in-1.*"},
		{EventSubject("in-1", EventStep), "fm.evt.in-1.step"},
		{LogSubject("in-1", "dss"), "fm.log.in-1.dss"},
		{AuditSubject("main", "instance"), "fm.audit.main.instance"},
		{InboxPrefix("in-1"), "_INBOX.in-1"},
		{InstanceFromSubject("fm.evt.in-1.step"), "in-1"},
		{InstanceFromSubject("fm.hb.in-1"), "in-1"},
		{InstanceFromSubject("other.x.y"), ""},
	}
	for _, tc := range tests {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func TestValidToken(t *testing.T) {
	for s, want := range map[string]bool{
		"in-abc_1": true, "": false, "a.b": false, "a*": false, "a>": false, "a b": false,
		strings.Repeat("a", 64): true, strings.Repeat("a", 65): false, "é": false,
	} {
		if got := ValidToken(s); got != want {
			t.Errorf("ValidToken(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestEnumsKnown(t *testing.T) {
	if len(SetupActionTypes) != 23 {
		t.Fatalf("the reference lists 23 setup action types, have %d", len(SetupActionTypes))
	}
	if !ActionUpdateDSSPort.Known() || SetupActionType("NOPE").Known() {
		t.Fatal("SetupActionType.Known is wrong")
	}
	if !StageAfterInstall.Known() || Stage("AFTER_INSTALL").Known() {
		t.Fatal("Stage.Known is wrong")
	}
	if !CommandRestartDSS.Known() || CommandKind("reboot").Known() {
		t.Fatal("CommandKind.Known is wrong")
	}
}

func FuzzDecode(f *testing.F) {
	for _, v := range vectors() {
		b, _ := Encode(v.msg)
		f.Add(b)
	}
	f.Add([]byte(`{"v":2}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, fresh := range []func() Message{
			func() Message { return &DesiredState{} }, func() Message { return &Command{} },
			func() Message { return &Event{} }, func() Message { return &Heartbeat{} },
			func() Message { return &AgentStatus{} }, func() Message { return &ProvisionRequest{} },
			func() Message { return &MachineState{} }, func() Message { return &AuditRecord{} },
		} {
			m := fresh()
			if err := Decode(data, m); err != nil {
				if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnsupportedVersion) {
					t.Fatalf("Decode returned an error of no known kind: %v", err)
				}
				continue
			}
			// Whatever decodes must encode again and validate.
			if _, err := Encode(m); err != nil {
				t.Fatalf("decoded message does not re-encode: %v", err)
			}
		}
	})
}

func TestCompareVersions(t *testing.T) {
	tests := []struct {
		a, b string
		want int
	}{
		{"14.0.0", "9.2.1", 1},
		{"13.4.0", "14.0.0", -1},
		{"14.0.0", "14.0.0", 0},
		{"14.0", "14.0.0", 0},
		{"14.0.1", "14.0", 1},
		{"14.0.0-beta", "14.0.0", 1},
		{"14.10.0", "14.9.9", 1},
	}
	for _, tc := range tests {
		if got := CompareVersions(tc.a, tc.b); got != tc.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

func TestHasMachine(t *testing.T) {
	for _, tc := range []struct {
		st   MachineState
		want bool
	}{
		{MachineState{}, false},
		{MachineState{Status: MachineRunning}, true},
		{MachineState{Status: MachineStopped}, true},
		{MachineState{Status: MachineProvisioning}, true},
		{MachineState{Status: MachineDeprovisioned, VolumeID: "v"}, false},
		{MachineState{Status: MachineDeleted}, false},
		{MachineState{Status: MachineFailed}, false},
		{MachineState{Status: MachineFailed, MachineID: "i-1"}, true},
		{MachineState{Status: MachineLost, MachineID: "i-1"}, true},
	} {
		if got := tc.st.HasMachine(); got != tc.want {
			t.Errorf("%+v: HasMachine() = %v", tc.st, got)
		}
	}
}

func TestProvisionRequestRules(t *testing.T) {
	base := func(a ProvisionAction) *ProvisionRequest {
		return &ProvisionRequest{ID: "op-1-x", Instance: "in-1", Action: a}
	}
	tests := []struct {
		name string
		req  *ProvisionRequest
		ok   bool
	}{
		{"snapshot", func() *ProvisionRequest {
			r := base(ProvisionSnapshot)
			r.Snapshot = &SnapshotRef{ID: "snap-1"}
			return r
		}(), true},
		{"snapshot without one", base(ProvisionSnapshot), false},
		{"delete-snapshot with a bad id", func() *ProvisionRequest {
			r := base(ProvisionDeleteSnapshot)
			r.Snapshot = &SnapshotRef{ID: "a.b"}
			return r
		}(), false},
		{"grow-volume", func() *ProvisionRequest { r := base(ProvisionGrowVolume); r.VolumeSizeGB = 75; return r }(), true},
		{"grow-volume without a size", base(ProvisionGrowVolume), false},
		{"restore with a bad id", func() *ProvisionRequest {
			r := base(ProvisionReprovision)
			r.Generation, r.Spec, r.FromSnapshot = 2, &MachineSpec{}, &SnapshotRef{ID: ""}
			return r
		}(), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.req.Validate(); (err == nil) != tc.ok {
				t.Fatalf("Validate = %v", err)
			}
		})
	}
}

// TestEventIDsMustBeValid: the ids an event names are looked up as keys; one
// that is not a valid key is refused when the event is read, not retried
// for ever by whoever folds it.
func TestEventIDsMustBeValid(t *testing.T) {
	for name, mutate := range map[string]func(*Event){
		"operation id": func(e *Event) { e.OpID = "op x" },
		"command id":   func(e *Event) { e.CommandID = "a.b" },
		"snapshot id":  func(e *Event) { e.Snapshot = &SnapshotRef{ID: "s/1"} },
	} {
		t.Run(name, func(t *testing.T) {
			e := &Event{ID: "e1", Instance: "i1", Kind: EventStep, Status: StatusOK, OpID: "op-1", CommandID: "op-1-cmd"}
			if err := e.Validate(); err != nil {
				t.Fatalf("a valid event was refused: %v", err)
			}
			mutate(e)
			if err := e.Validate(); err == nil {
				t.Fatal("an event with an invalid id was accepted")
			}
		})
	}
}

// TestCommandsAfterResponseIsChecked: an agent runs what a catch-up answer
// holds in order, so an answer out of order, too long or both failed and
// full does not decode.
func TestCommandsAfterResponseIsChecked(t *testing.T) {
	many := make([]StoredCommand, MaxCommandsPerAnswer+1)
	for i := range many {
		many[i].Seq = uint64(i + 1)
	}
	tests := []struct {
		name string
		resp CommandsAfterResponse
		ok   bool
	}{
		{"empty", CommandsAfterResponse{}, true},
		{"in order", CommandsAfterResponse{Commands: []StoredCommand{{Seq: 3}, {Seq: 9}}, More: true}, true},
		{"the most at once", CommandsAfterResponse{Commands: many[:MaxCommandsPerAnswer]}, true},
		{"an error", CommandsAfterResponse{Error: Errorf(CodeNotFound, "no such instance")}, true},
		{"too many", CommandsAfterResponse{Commands: many}, false},
		{"out of order", CommandsAfterResponse{Commands: []StoredCommand{{Seq: 9}, {Seq: 3}}}, false},
		{"twice the same", CommandsAfterResponse{Commands: []StoredCommand{{Seq: 3}, {Seq: 3}}}, false},
		{"sequence zero", CommandsAfterResponse{Commands: []StoredCommand{{Seq: 0}}}, false},
		{"more of nothing", CommandsAfterResponse{More: true}, false},
		{"an error with commands", CommandsAfterResponse{Commands: []StoredCommand{{Seq: 3}}, Error: Errorf(CodeInternal, "x")}, false},
		{"a reset", CommandsAfterResponse{Reset: true}, true},
		{"a reset with commands", CommandsAfterResponse{Reset: true, Commands: []StoredCommand{{Seq: 3}}}, false},
		{"a reset and an error", CommandsAfterResponse{Reset: true, Error: Errorf(CodeInternal, "x")}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.resp.V = Version
			data, err := json.Marshal(&tc.resp)
			if err != nil {
				t.Fatal(err)
			}
			var got CommandsAfterResponse
			if err := Decode(data, &got); (err == nil) != tc.ok {
				t.Fatalf("Decode: %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

const (
	awsKeyID  = "AKIAIOSFODNN7EXAMPLE"
	awsSecret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
)

func TestValidAWSCredentials(t *testing.T) {
	d := vectors()["desired_state"].msg.(*DesiredState)
	d.DSS.AWSCredentials = &AWSCredentials{AccessKeyID: awsKeyID, SecretAccessKey: awsSecret}
	if err := d.Validate(); err != nil {
		t.Fatalf("a good key pair refused: %v", err)
	}
}

func TestValidateTools(t *testing.T) {
	const sum = "298e19e9c6c17199011404278f0ff8168a7eca4217edad9097af577023a5620f"
	tests := []struct {
		name  string
		tools map[string]ToolSource
		err   string
	}{
		{"none", nil, ""},
		{"a program", map[string]ToolSource{"kubectl": {URL: "https://dl.k8s.io/kubectl", SHA256: sum}}, ""},
		{"an archive's program", map[string]ToolSource{"python3.8": {URL: "file:///srv/python.tgz", SHA256: strings.ToUpper(sum), Binary: "python/bin/python3.8"}}, ""},
		{"a name with a slash", map[string]ToolSource{"bin/kubectl": {URL: "https://x/k", SHA256: sum}}, "not a program name"},
		{"an upper-case name", map[string]ToolSource{"Kubectl": {URL: "https://x/k", SHA256: sum}}, "not a program name"},
		{"no digest", map[string]ToolSource{"kubectl": {URL: "https://x/k"}}, "64 hex characters"},
		{"an ftp URL", map[string]ToolSource{"kubectl": {URL: "ftp://x/k", SHA256: sum}}, "not an http(s):// or file:// URL"},
		{"an http URL without host", map[string]ToolSource{"kubectl": {URL: "https:///k", SHA256: sum}}, "not an http(s):// or file:// URL"},
		{"a binary outside", map[string]ToolSource{"kubectl": {URL: "https://x/k.tgz", SHA256: sum, Binary: "../../bin/sh"}}, "inside the archive"},
		{"an absolute binary", map[string]ToolSource{"kubectl": {URL: "https://x/k.tgz", SHA256: sum, Binary: "/bin/sh"}}, "inside the archive"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateTools(tc.tools)
			if (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err = %v, want %q", err, tc.err)
			}
		})
	}
	if !(ToolSource{URL: "https://x/eksctl_Linux_amd64.tar.gz?sig=1"}).IsArchive() || (ToolSource{URL: "https://x/kubectl"}).IsArchive() {
		t.Fatal("IsArchive")
	}
}
