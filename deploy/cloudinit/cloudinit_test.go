package cloudinit

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func validParams() Params {
	return Params{
		Instance: "in-abc", VolumeID: "vol-0123456789abcdef0", DeviceName: "/dev/sdf",
		DownloadURL: "https://fm.example.com:10000/download/fm", DownloadSHA256: strings.Repeat("ab", 32),
		CACert:      "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
		AgentConfig: []byte(`{"instance": "in-abc", "join": {"token": "t0k"}}`),
	}
}

func TestUserDataRoundTrip(t *testing.T) {
	p := validParams()
	ud, err := UserData(p)
	if err != nil {
		t.Fatal(err)
	}
	s := string(ud)
	for _, want := range []string{
		"#!/bin/bash", "nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0", "/dev/sdf", "/dev/xvdf",
		"--cacert /etc/fm/ca.pem", "'" + p.DownloadURL + "'", p.DownloadSHA256 + "  /usr/local/bin/fm.download",
		"RestartPreventExitStatus=3", "systemctl enable --now fm-agent.service", "MIIB",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("user data lacks %q", want)
		}
	}
	cfg, err := AgentConfig(ud)
	if err != nil || string(cfg) != string(p.AgentConfig) {
		t.Fatalf("AgentConfig = %q, %v; want %q", cfg, err, p.AgentConfig)
	}
	// The script is valid shell.
	if bash, err := exec.LookPath("bash"); err == nil {
		f := filepath.Join(t.TempDir(), "ud.sh")
		if err := os.WriteFile(f, ud, 0o600); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(bash, "-n", f).CombinedOutput(); err != nil {
			t.Fatalf("bash -n: %v\n%s", err, out)
		}
	}
}

func TestUserDataWithoutCA(t *testing.T) {
	p := validParams()
	p.CACert, p.DownloadURL = "", "http://10.0.0.5:10000/download/fm"
	ud, err := UserData(p)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(ud), "cacert") || strings.Contains(string(ud), "ca.pem <<") {
		t.Fatal("a CA is used without one")
	}
}

func TestUserDataRefusesBadParams(t *testing.T) {
	for name, mutate := range map[string]func(*Params){
		"url not http":      func(p *Params) { p.DownloadURL = "file:///etc/passwd" },
		"url with a quote":  func(p *Params) { p.DownloadURL = "https://x/'; rm -rf /'" },
		"short digest":      func(p *Params) { p.DownloadSHA256 = "abc" },
		"config not json":   func(p *Params) { p.AgentConfig = []byte("{") },
		"volume with shell": func(p *Params) { p.VolumeID = "vol-1;reboot" },
		"marker in config":  func(p *Params) { p.AgentConfig = []byte(`{"x":"FM_AGENT_CONFIG"}`) },
		"too big":           func(p *Params) { p.AgentConfig = []byte(`{"x":"` + strings.Repeat("a", MaxSize) + `"}`) },
	} {
		t.Run(name, func(t *testing.T) {
			p := validParams()
			mutate(&p)
			if _, err := UserData(p); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	if _, err := AgentConfig([]byte("#!/bin/sh\necho hi\n")); err == nil {
		t.Fatal("AgentConfig found a config in foreign user data")
	}
}

// TestTheUnitPutsThePreviousAgentBack runs fm-agent.service's
// ExecStopPost as systemd would (its $$ unescaped, in a throwaway root):
// a new agent binary on trial that fails three times is replaced by the
// previous one; a clean stop, or no trial, changes nothing.
func TestTheUnitPutsThePreviousAgentBack(t *testing.T) {
	var script string
	for _, line := range strings.Split(Unit, "\n") {
		if rest, ok := strings.CutPrefix(line, "ExecStopPost=-/bin/sh -c '"); ok {
			script = strings.TrimSuffix(rest, "'")
		}
	}
	if script == "" {
		t.Fatal("fm-agent.service has no ExecStopPost shell command")
	}
	tests := []struct {
		name     string
		trial    bool
		results  []string
		restored bool
	}{
		{name: "three failed exits on trial", trial: true, results: []string{"exit-code", "signal", "core-dump"}, restored: true},
		{name: "two failed exits on trial", trial: true, results: []string{"exit-code", "exit-code"}},
		{name: "clean stops on trial", trial: true, results: []string{"success", "success", "success"}},
		{name: "failed exits with no trial", results: []string{"exit-code", "exit-code", "exit-code"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			state, bin := filepath.Join(root, "var", "lib", "fm-agent"), filepath.Join(root, "usr", "local", "bin")
			for _, d := range []string{state, bin} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			write := func(p, s string) {
				if err := os.WriteFile(p, []byte(s), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			write(filepath.Join(bin, "fm"), "new")
			write(filepath.Join(bin, "fm.previous"), "old")
			if tc.trial {
				write(filepath.Join(state, "upgrade-trial"), "")
			}
			sh := strings.NewReplacer("$$", "$", "/var/lib/fm-agent", state, "/usr/local/bin", bin).Replace(script)
			for _, res := range tc.results {
				cmd := exec.Command("/bin/sh", "-c", sh)
				cmd.Env = append(os.Environ(), "SERVICE_RESULT="+res)
				if out, err := cmd.CombinedOutput(); err != nil {
					t.Fatalf("ExecStopPost (%s): %v\n%s", res, err, out)
				}
			}
			got, _ := os.ReadFile(filepath.Join(bin, "fm"))
			_, trialLeft := os.Stat(filepath.Join(state, "upgrade-trial"))
			if want := map[bool]string{true: "old", false: "new"}[tc.restored]; string(got) != want {
				t.Fatalf("the binary is %q, want %q", got, want)
			}
			if tc.restored && trialLeft == nil {
				t.Error("the trial file was left after the binary was put back")
			}
		})
	}
}
