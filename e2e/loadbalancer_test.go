package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestLoadBalancerOnFMDev drives a load balancer as Dataiku's AWS client
// does (contract §4.4) against fm dev, whose local backend serves it with a
// reverse proxy: requests reach the node their host names, an update adds
// a node without the first one missing a request, a node's instance cannot
// be deleted, a restart of fm dev serves it again on the same address, and
// deprovision and delete leave nothing.
func TestLoadBalancerOnFMDev(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	var vn, tpl map[string]any
	py.Do(t, "POST", "/virtual-networks?useDefaultValues=True", `{"label": "lb-net"}`, &vn)
	py.Do(t, "POST", "/instance-settings-templates", `{"label": "lb-tpl"}`, &tpl)
	ids := map[string]string{}
	for name, image := range map[string]string{"a": "dss-14.0.0-standin", "b": "dss-13.4.0-standin"} {
		var in, f map[string]any
		body := fmt.Sprintf(`{"label": "lb-%s", "instanceSettingsTemplateId": %q, "virtualNetworkId": %q, "imageId": %q}`, name, tpl["id"], vn["id"], image)
		if code := py.Do(t, "POST", "/instances", body, &in); code != 200 {
			t.Fatalf("instance: %d %v", code, in)
		}
		ids[name] = in["id"].(string)
		py.Do(t, "GET", "/instances/"+ids[name]+"/actions/reprovision", "", &f)
		if res, code := py.wait(t, f); code != 200 || res["state"] != "succeeded" {
			t.Fatalf("reprovision %s: %d %v", name, code, res)
		}
	}
	for _, id := range ids {
		d.waitStatus(t, py, id, "running with DSS up", func(st map[string]any) bool {
			dss, _ := st["dss"].(map[string]any)
			return st["state"] == "running" && dss["state"] == "running"
		})
	}

	// Created as the AWS creator sends it; Azure's creator is refused.
	var lb map[string]any
	create := fmt.Sprintf(`{"name": "front", "virtualNetworkId": %q, "azureAssignPublicIP": false, "nodes": [{"hostname": "A.example.com", "instanceId": %q}],
		"certificateMode": "AWS_ARN", "awsCertificateARN": "arn:aws:acm:eu-west-1:123456789012:certificate/0f1e2d3c", "cloudTags": {"team": "data"}, "fmTags": ["web"]}`, vn["id"], ids["a"])
	if code := py.Do(t, "POST", "/load-balancers", create, &lb); code != 200 || lb["state"] != "NOT_PROVISIONED" {
		t.Fatalf("create: %d %v", code, lb)
	}
	id := lb["id"].(string)
	var refused map[string]any
	if code := py.Do(t, "POST", "/load-balancers", fmt.Sprintf(`{"name": "az", "virtualNetworkId": %q, "azureAssignPublicIP": false, "nodes": [], "tier": "WAF_V2", "certificateMode": "AZURE_SECRET_ID"}`, vn["id"]), &refused); code != 501 {
		t.Fatalf("an Azure load balancer: %d %v", code, refused)
	}
	if code := py.Do(t, "POST", "/load-balancers", fmt.Sprintf(`{"name": "bad", "virtualNetworkId": %q, "azureAssignPublicIP": false, "nodes": [{"hostname": "x.example.com", "instanceId": "in-nothere00"}]}`, vn["id"]), &refused); code != 400 {
		t.Fatalf("a node of no instance: %d %v", code, refused)
	}

	lbAction := func(action string) map[string]any {
		t.Helper()
		var f map[string]any
		if code := py.Do(t, "POST", "/load-balancers/"+id+"/actions/"+action, "", &f); code != 200 {
			t.Fatalf("%s: %d %v", action, code, f)
		}
		res, code := py.wait(t, f)
		if code != 200 || res["state"] != "succeeded" {
			t.Fatalf("%s: %d %v", action, code, res)
		}
		return res
	}
	lbAction("provision")
	var phys map[string]any
	py.Do(t, "GET", "/load-balancers/"+id+"/physical/status", "", &phys)
	addr, _ := phys["address"].(string)
	if phys["status"] != "active" || addr == "" {
		t.Fatalf("physical status: %v", phys)
	}
	via := func(host string) (int, string) {
		req, _ := http.NewRequest("GET", "http://"+addr+"/api/health", nil)
		req.Host = host
		resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := via("a.example.com"); code != 200 || !strings.Contains(body, `"version":"14.0.0"`) {
		t.Fatalf("node a through the load balancer: %d %s", code, body)
	}
	if code, body := via("b.example.com"); code != 404 {
		t.Fatalf("a host of no node: %d %s", code, body)
	}

	// The client's add_node then save: PUT the whole object, then update.
	py.Do(t, "GET", "/load-balancers/"+id, "", &lb)
	lb["nodes"] = append(lb["nodes"].([]any), map[string]any{"hostname": "b.example.com", "instanceId": ids["b"]})
	lb["description"] = "two nodes"
	body, _ := json.Marshal(lb)
	if code := py.Do(t, "PUT", "/load-balancers/"+id, string(body), &lb); code != 200 || lb["state"] != "PROVISIONED" {
		t.Fatalf("save: %d %v", code, lb)
	}
	stop := make(chan struct{})
	missed := make(chan string, 1)
	go func() {
		// Node a answers all along the update.
		for {
			select {
			case <-stop:
				close(missed)
				return
			default:
			}
			if code, body := via("a.example.com"); code != 200 {
				missed <- fmt.Sprintf("%d %s", code, body)
				<-stop
				close(missed)
				return
			}
		}
	}()
	lbAction("update")
	close(stop)
	if m, ok := <-missed; ok {
		t.Fatalf("node a missed a request during the update: %s", m)
	}
	if code, body := via("b.example.com"); code != 200 || !strings.Contains(body, `"version":"13.4.0"`) {
		t.Fatalf("node b after the update: %d %s", code, body)
	}

	// A node's instance cannot be deleted.
	var f map[string]any
	if code := py.Do(t, "GET", "/instances/"+ids["b"]+"/actions/delete?force=True", "", &f); code != 409 || !strings.Contains(fmt.Sprint(f), id) {
		t.Fatalf("deleting a node's instance: %d %v", code, f)
	}

	// fm dev stopped and started again: the load balancer is served again,
	// on the same address.
	if err := d.proc.Interrupt(15 * time.Second); err != nil {
		t.Fatal(err)
	}
	d = d.restart(t)
	py = NewPython(t, d.url, d.keyFile)
	deadline := time.Now().Add(30 * time.Second)
	for code, _ := via("b.example.com"); code != 200; code, _ = via("b.example.com") {
		if time.Now().After(deadline) {
			t.Fatalf("the load balancer is not served after a restart (%d)", code)
		}
		time.Sleep(100 * time.Millisecond)
	}

	lbAction("deprovision")
	if code, _ := via("a.example.com"); code != 0 {
		t.Fatalf("a deprovisioned load balancer still answers: %d", code)
	}
	lb = nil // a fresh map: one decoded into keeps the keys the answer leaves out
	py.Do(t, "GET", "/load-balancers/"+id, "", &lb)
	if lb["state"] != "NOT_PROVISIONED" || lb["address"] != nil {
		t.Fatalf("after deprovision: %v", lb)
	}
	lbAction("provision")
	py.Do(t, "GET", "/load-balancers/"+id+"/physical/status", "", &phys)
	addr, _ = phys["address"].(string)
	if code, _ := via("a.example.com"); code != 200 {
		t.Fatalf("provisioned again: %d", code)
	}
	f = nil
	if code := py.Do(t, "DELETE", "/load-balancers/"+id, "", &f); code != 200 {
		t.Fatalf("delete: %d %v", code, f)
	}
	if res, code := py.wait(t, f); code != 200 || res["state"] != "succeeded" {
		t.Fatalf("delete: %d %v", code, res)
	}
	if code := py.Do(t, "GET", "/load-balancers/"+id, "", nil); code != 404 {
		t.Fatalf("a deleted load balancer: %d", code)
	}
	if code, _ := via("a.example.com"); code != 0 {
		t.Fatalf("a deleted load balancer still answers: %d", code)
	}
	f = nil
	if code := py.Do(t, "GET", "/instances/"+ids["b"]+"/actions/delete?force=True", "", &f); code != 200 {
		t.Fatalf("deleting an instance no load balancer uses: %d %v", code, f)
	}
}
