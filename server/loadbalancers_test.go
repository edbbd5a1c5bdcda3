package server_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nats.go/jetstream"
)

// lbFleet is a network with two subnets (an AWS load balancer spans two
// zones), a template and an image.
func (f *fm) lbFleet() (api.VirtualNetwork, api.InstanceSettingsTemplate, api.Image) {
	f.t.Helper()
	_, tpl, im := f.fleet()
	vn := f.createNetwork(`{"label":"lb-net","mode":"EXISTING_MONOTENANT","awsVpcId":"vpc-1","awsSubnetId":"subnet-1","awsSecondSubnetId":"subnet-2","awsAutoCreateSecurityGroups":true}`)
	return vn, tpl, im
}

func lbBody(name, vn string, nodes ...string) string {
	var ns []string
	for i := 0; i+1 < len(nodes); i += 2 {
		ns = append(ns, `{"hostname":"`+nodes[i]+`","instanceId":"`+nodes[i+1]+`"}`)
	}
	return `{"name":"` + name + `","virtualNetworkId":"` + vn + `","azureAssignPublicIP":false,"nodes":[` + strings.Join(ns, ",") + `]}`
}

// TestLoadBalancerSettings: what a save or a create accepts and refuses,
// with a clear error that changes nothing; an echo keeps FM's fields and
// the keys FM does not know; what uses a network or an instance keeps it.
func TestLoadBalancerSettings(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	other := f.createNetwork(`{"label":"other","mode":"EXISTING_MONOTENANT","awsVpcId":"vpc-2","awsSubnetId":"subnet-2","awsAutoCreateSecurityGroups":true}`)
	a := f.createInstance(instanceBody("a", vn.ID, tpl.ID, im.ID))
	elsewhere := f.createInstance(instanceBody("far", other.ID, tpl.ID, im.ID))

	var lb api.LoadBalancer
	f.ok(f.do("POST", "/load-balancers", `{"name":"front","virtualNetworkId":"`+vn.ID+`","azureAssignPublicIP":false,"certificateMode":"AWS_ARN",
		"awsCertificateARN":"arn:aws:acm:eu-west-1:123456789012:certificate/abc","publicIpMode":"NO_PUBLIC_IP","nodes":[{"hostname":"A.Example.com","instanceId":"`+a.ID+`"}],
		"someFutureKey":{"x":1}}`), &lb)
	if lb.State != api.LBStateNotProvisioned || len(lb.Nodes) != 1 || lb.Nodes[0].Hostname != "a.example.com" || lb.PublicIPMode != api.LBNoPublicIP {
		t.Fatalf("created: %+v", lb)
	}
	for _, tc := range []struct{ name, body, field string }{
		{"no name", lbBody("", vn.ID), "name"},
		{"no network", lbBody("x", ""), "virtualNetworkId"},
		{"a network that does not exist", lbBody("x", "vn-nothere000"), "virtualNetworkId"},
		{"a bad host name", lbBody("x", vn.ID, "not a host", a.ID), "nodes[0].hostname"},
		{"a host name twice", lbBody("x", vn.ID, "a.example.com", a.ID, "A.example.com", a.ID), "nodes[1].hostname"},
		{"an instance that does not exist", lbBody("x", vn.ID, "a.example.com", "in-nothere000"), "nodes[0].instanceId"},
		{"an instance of another network", lbBody("x", vn.ID, "a.example.com", elsewhere.ID), "nodes[0].instanceId"},
		{"a certificate that is no ARN", `{"name":"x","virtualNetworkId":"` + vn.ID + `","awsCertificateARN":"my-cert","nodes":[]}`, "awsCertificateARN"},
		{"an unknown public IP mode", `{"name":"x","virtualNetworkId":"` + vn.ID + `","publicIpMode":"SOMETIMES","nodes":[]}`, "publicIpMode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := f.failed(f.do("POST", "/load-balancers", tc.body), 400, "InvalidArgument")
			if !strings.Contains(e.DetailedMessage, tc.field) {
				t.Fatalf("the error does not name %s: %s", tc.field, e.DetailedMessage)
			}
			var before, after map[string]any
			f.ok(f.do("GET", "/load-balancers/"+lb.ID, ""), &before)
			r := f.do("PUT", "/load-balancers/"+lb.ID, tc.body)
			if r.status != 400 {
				t.Fatalf("save: %d %s", r.status, r.body)
			}
			f.ok(f.do("GET", "/load-balancers/"+lb.ID, ""), &after)
			if b, a := mustJSON(t, before), mustJSON(t, after); a != b {
				t.Fatalf("a refused save changed the load balancer: %s -> %s", b, a)
			}
		})
	}
	e := f.failed(f.do("POST", "/load-balancers", `{"name":"az","virtualNetworkId":"`+vn.ID+`","azureAssignPublicIP":false,"nodes":[],"tier":"WAF_V2","certificateMode":"AZURE_SECRET_ID","azureCertificateSecretId":"s"}`), 501, "Unimplemented")
	if !strings.Contains(e.DetailedMessage, "Azure") {
		t.Fatal(e.DetailedMessage)
	}
	// The contract's modes: DYNAMIC_PUBLIC_IP is internet-facing, as AWS's
	// are; STATIC_PUBLIC_IP is Azure's.
	f.failed(f.do("POST", "/load-balancers", `{"name":"st","virtualNetworkId":"`+vn.ID+`","publicIpMode":"STATIC_PUBLIC_IP","nodes":[]}`), 501, "Unimplemented")
	var dyn api.LoadBalancer
	f.ok(f.do("POST", "/load-balancers", `{"name":"dyn","virtualNetworkId":"`+vn.ID+`","publicIpMode":"DYNAMIC_PUBLIC_IP","nodes":[]}`), &dyn)
	// The client's set_certificate_arn("") on one made with a certificate:
	// the mode stays in the echo, and means no certificate now.
	f.ok(f.do("PUT", "/load-balancers/"+dyn.ID, `{"name":"dyn","virtualNetworkId":"`+vn.ID+`","certificateMode":"AWS_ARN","awsCertificateARN":"","nodes":[]}`), &dyn)
	if dyn.CertificateMode != "" || dyn.AWSCertificateARN != "" {
		t.Fatalf("a certificate emptied: %+v", dyn)
	}
	f.ok(f.do("DELETE", "/load-balancers/"+dyn.ID, ""), nil)
	var all []api.LoadBalancer
	f.ok(f.do("GET", "/load-balancers", ""), &all)
	if len(all) != 1 {
		t.Fatalf("bad input stored something: %+v", all)
	}
	var raw map[string]any
	f.ok(f.do("GET", "/load-balancers/"+lb.ID, ""), &raw)
	if raw["someFutureKey"] == nil || raw["nodes"] == nil {
		t.Fatalf("the object lost a key: %v", raw)
	}

	// The client's save: the whole object echoed with a change; FM's fields
	// in the body are not taken.
	raw["description"], raw["state"], raw["address"] = "the front door", "PROVISIONED", "evil.example.com"
	body, _ := json.Marshal(raw)
	f.ok(f.do("PUT", "/load-balancers/"+lb.ID, string(body)), &lb)
	if lb.Description != "the front door" || lb.State != api.LBStateNotProvisioned || lb.Address != "" || lb.Extra["someFutureKey"] == nil {
		t.Fatalf("saved: %+v", lb)
	}

	// What uses a network or an instance keeps it; a viewer changes nothing.
	f.failed(f.do("GET", "/instances/"+a.ID+"/actions/delete", ""), 409, "FailedPrecondition")
	f.failed(f.do("DELETE", "/virtual-networks/"+vn.ID, ""), 409, "FailedPrecondition")
	viewer := f.newKey("viewer")
	if r := f.doAs("POST", "/load-balancers", lbBody("v", vn.ID), viewer.ID, viewer.Secret); r.status != http.StatusForbidden {
		t.Fatalf("a viewer's create: %d", r.status)
	}
	if r := f.doAs("POST", "/load-balancers/"+lb.ID+"/actions/provision", "", viewer.ID, viewer.Secret); r.status != http.StatusForbidden {
		t.Fatalf("a viewer's provision: %d", r.status)
	}
	if r := f.doAs("GET", "/load-balancers/"+lb.ID+"/physical/status", "", viewer.ID, viewer.Secret); r.status != http.StatusOK {
		t.Fatalf("a viewer's physical status: %d", r.status)
	}

	// Never made: deleted at once; then the instance goes.
	var del api.Future
	f.ok(f.do("DELETE", "/load-balancers/"+lb.ID, ""), &del)
	if del.State != api.OpSucceeded {
		t.Fatalf("delete: %+v", del)
	}
	f.failed(f.do("GET", "/load-balancers/"+lb.ID, ""), 404, "NotFound")
	f.ok(f.do("GET", "/instances/"+a.ID+"/actions/delete", ""), nil)
}

// fakeBalancers plays the provisioner's part for load balancers: it
// answers each request it finds in FM_PROVISION by writing fm_balancers as
// the provisioner would, with outcome deciding success.
type fakeBalancers struct {
	t       *testing.T
	js      jetstream.JetStream
	mu      sync.Mutex
	fail    bool
	handled []protocol.ProvisionRequest
}

func (fb *fakeBalancers) lastRequest(id string, action protocol.ProvisionAction) protocol.ProvisionRequest {
	fb.t.Helper()
	st, err := fb.js.Stream(context.Background(), protocol.StreamProvision)
	if err != nil {
		fb.t.Fatal(err)
	}
	var req protocol.ProvisionRequest
	waitFor(fb.t, "a "+string(action)+" request", func() bool {
		m, err := st.GetLastMsgForSubject(context.Background(), protocol.ProvisionSubject(id, action))
		return err == nil && protocol.Decode(m.Data, &req) == nil && !fb.seen(req.ID)
	})
	return req
}

func (fb *fakeBalancers) seen(id string) bool {
	fb.mu.Lock()
	defer fb.mu.Unlock()
	for _, r := range fb.handled {
		if r.ID == id {
			return true
		}
	}
	return false
}

// answer handles the last request of that action as the provisioner does.
func (fb *fakeBalancers) answer(id string, action protocol.ProvisionAction) protocol.ProvisionRequest {
	fb.t.Helper()
	req := fb.lastRequest(id, action)
	fb.mu.Lock()
	fb.handled = append(fb.handled, req)
	fail := fb.fail
	fb.mu.Unlock()
	st := protocol.BalancerState{ID: id, Backend: "fake", RequestID: req.ID, Action: req.Action, Order: req.Order, Updated: time.Now()}
	switch {
	case fail:
		st.Status, st.Error = protocol.BalancerFailed, protocol.Errorf(protocol.CodeFailedPrecondition, "the certificate is in another region")
	case action == protocol.ProvisionBalancerDelete:
		st.Status = protocol.BalancerDeleted
	default:
		st.Status, st.Address, st.Nodes = protocol.BalancerActive, "fm-"+id+".elb.example.com", req.LoadBalancer.Nodes
	}
	kv, err := fb.js.KeyValue(context.Background(), protocol.BucketBalancers)
	if err != nil {
		fb.t.Fatal(err)
	}
	data, err := protocol.Encode(&st)
	if err != nil {
		fb.t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), id, data); err != nil {
		fb.t.Fatal(err)
	}
	return req
}

// TestLoadBalancerActions: each action is an operation that claims the load
// balancer, sends one request (with the nodes' machines, in order) and
// ends as the provisioner's record says; one at a time; a failure is kept
// on the load balancer; a delete of one made removes it from the cloud
// first.
func TestLoadBalancerActions(t *testing.T) {
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		c.SweepInterval, c.RepublishAfter = 100*time.Millisecond, 300*time.Millisecond
	}))
	js := f.env.Bus.JetStream(t)
	fb := &fakeBalancers{t: t, js: js}
	vn, tpl, im := f.lbFleet()
	a := f.createInstance(instanceBody("a", vn.ID, tpl.ID, im.ID))
	var lb api.LoadBalancer
	f.ok(f.do("POST", "/load-balancers", lbBody("front", vn.ID, "a.example.com", a.ID)), &lb)

	// A node without a running machine: nothing to send requests to.
	e := f.failed(f.do("POST", "/load-balancers/"+lb.ID+"/actions/provision", ""), 409, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, a.ID) {
		t.Fatal(e.DetailedMessage)
	}
	machineRunning(t, js, a.ID, "req-a")
	f.failed(f.do("POST", "/load-balancers/"+lb.ID+"/actions/update", ""), 409, "FailedPrecondition") // not made yet
	// The instance's agent says DSS answers on port 22 (a compromised
	// machine pointing its host name at another service): not believed.
	agents, err := js.KeyValue(context.Background(), protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}
	lying := protocol.AgentStatus{Instance: a.ID, Time: time.Now().UTC(), Phase: protocol.PhaseReady,
		DSS: protocol.DSSStatus{State: protocol.DSSRunning, Version: "14.0.0", NodeType: "design", Port: 22}}
	data, _ := protocol.Encode(&lying)
	if _, err := agents.Put(context.Background(), a.ID, data); err != nil {
		t.Fatal(err)
	}

	// On AWS, a network without a second subnet has no room for one:
	// refused before anything is sent.
	one := f.createNetwork(`{"label":"one-subnet","mode":"EXISTING_MONOTENANT","awsVpcId":"vpc-1","awsSubnetId":"subnet-1","awsAutoCreateSecurityGroups":true}`)
	var narrow api.LoadBalancer
	f.ok(f.do("POST", "/load-balancers", lbBody("narrow", one.ID)), &narrow)
	if e := f.failed(f.do("POST", "/load-balancers/"+narrow.ID+"/actions/provision", ""), 409, "FailedPrecondition"); !strings.Contains(e.DetailedMessage, "second subnet") {
		t.Fatal(e.DetailedMessage)
	}

	var op api.Future
	f.ok(f.do("POST", "/load-balancers/"+lb.ID+"/actions/provision", ""), &op)
	if op.State != api.OpRunning || op.TargetID != lb.ID || op.TargetKind != "loadBalancer" {
		t.Fatalf("provision: %+v", op)
	}
	f.failed(f.do("POST", "/load-balancers/"+lb.ID+"/actions/provision", ""), 409, "FailedPrecondition") // one at a time
	req := fb.answer(lb.ID, protocol.ProvisionBalancerApply)
	if req.Order != 1 || req.Instance != "" || req.LoadBalancer.ID != lb.ID || len(req.LoadBalancer.Nodes) != 1 || req.LoadBalancer.Nodes[0].MachineID != "m-1" ||
		req.LoadBalancer.Nodes[0].Hostname != "a.example.com" || req.LoadBalancer.Nodes[0].Port != 10000 || req.LoadBalancer.Network.VpcID != "vpc-1" {
		t.Fatalf("the request: %+v %+v", req, req.LoadBalancer)
	}
	f.waitFuture(op.JobID, api.OpSucceeded, 10*time.Second)
	waitFor(t, "the load balancer provisioned", func() bool {
		f.ok(f.do("GET", "/load-balancers/"+lb.ID, ""), &lb)
		return lb.State == api.LBStateProvisioned && lb.OperationID == ""
	})
	if lb.Address != "fm-"+lb.ID+".elb.example.com" {
		t.Fatalf("address %q", lb.Address)
	}
	var phys api.LoadBalancerPhysicalStatus
	f.ok(f.do("GET", "/load-balancers/"+lb.ID+"/physical/status", ""), &phys)
	if phys.Status != "active" || len(phys.Nodes) != 1 || phys.Nodes[0].InstanceID != a.ID {
		t.Fatalf("physical status %+v", phys)
	}

	// A failed update: the operation says why, and so does the load
	// balancer; the next update goes on from there, in order.
	fb.fail = true
	f.ok(f.do("POST", "/load-balancers/"+lb.ID+"/actions/update", ""), &op)
	if req := fb.answer(lb.ID, protocol.ProvisionBalancerApply); req.Order != 2 {
		t.Fatalf("order %d", req.Order)
	}
	failed := f.waitFuture(op.JobID, api.OpFailed, 10*time.Second)
	if failed.Error == nil || !strings.Contains(failed.Error.DetailedMessage, "another region") {
		t.Fatalf("failed update: %+v", failed.Error)
	}
	waitFor(t, "the load balancer failed", func() bool {
		f.ok(f.do("GET", "/load-balancers/"+lb.ID, ""), &lb)
		return lb.State == api.LBStateFailed && lb.OperationID == "" && lb.Error != nil
	})
	fb.fail = false
	f.ok(f.do("POST", "/load-balancers/"+lb.ID+"/actions/update", ""), &op)
	if req := fb.answer(lb.ID, protocol.ProvisionBalancerApply); req.Order != 3 {
		t.Fatalf("order %d", req.Order)
	}
	f.waitFuture(op.JobID, api.OpSucceeded, 10*time.Second)

	// Deprovisioned: no address any more; provisioned again.
	waitFor(t, "the load balancer free", func() bool {
		f.ok(f.do("GET", "/load-balancers/"+lb.ID, ""), &lb)
		return lb.OperationID == ""
	})
	f.ok(f.do("POST", "/load-balancers/"+lb.ID+"/actions/deprovision", ""), &op)
	fb.answer(lb.ID, protocol.ProvisionBalancerDelete)
	f.waitFuture(op.JobID, api.OpSucceeded, 10*time.Second)
	// The operation ends first; the load balancer is settled from it just
	// after (as the failed update above is waited for).
	waitFor(t, "the load balancer deprovisioned", func() bool {
		f.ok(f.do("GET", "/load-balancers/"+lb.ID, ""), &lb)
		return lb.OperationID == ""
	})
	if lb.State != api.LBStateNotProvisioned || lb.Address != "" {
		t.Fatalf("deprovisioned: %+v", lb)
	}
	f.ok(f.do("POST", "/load-balancers/"+lb.ID+"/actions/provision", ""), &op)
	fb.answer(lb.ID, protocol.ProvisionBalancerApply)
	f.waitFuture(op.JobID, api.OpSucceeded, 10*time.Second)

	// The delete of one made: removed from the cloud, then gone.
	waitFor(t, "the load balancer free", func() bool {
		f.ok(f.do("GET", "/load-balancers/"+lb.ID, ""), &lb)
		return lb.OperationID == ""
	})
	f.ok(f.do("DELETE", "/load-balancers/"+lb.ID, ""), &op)
	if op.State != api.OpRunning {
		t.Fatalf("delete: %+v", op)
	}
	f.failed(f.do("PUT", "/load-balancers/"+lb.ID, lbBody("x", vn.ID)), 409, "FailedPrecondition") // being deleted
	fb.answer(lb.ID, protocol.ProvisionBalancerDelete)
	f.waitFuture(op.JobID, api.OpSucceeded, 10*time.Second)
	waitFor(t, "the load balancer gone", func() bool { return f.do("GET", "/load-balancers/"+lb.ID, "").status == 404 })
}

// TestALoadBalancerActionThatDies: the server died between recording a load
// balancer's operation and claiming the load balancer: the sweep ends the
// operation as never started, sends nothing, and the load balancer is free.
func TestALoadBalancerActionThatDies(t *testing.T) {
	dead := make(chan struct{})
	var die sync.Once
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		c.SweepInterval, c.RepublishAfter = 100*time.Millisecond, 300*time.Millisecond
		c.Crash = func(point string) {
			if point == "server/lb/op-recorded" {
				die.Do(func() { <-dead })
			}
		}
	}))
	t.Cleanup(func() { close(dead) })
	js := f.env.Bus.JetStream(t)
	vn, tpl, im := f.lbFleet()
	a := f.createInstance(instanceBody("a", vn.ID, tpl.ID, im.ID))
	machineRunning(t, js, a.ID, "req-a")
	var lb api.LoadBalancer
	f.ok(f.do("POST", "/load-balancers", lbBody("front", vn.ID, "a.example.com", a.ID)), &lb)
	go f.send("POST", "/load-balancers/"+lb.ID+"/actions/provision")
	var ended api.Future
	waitFor(t, "the operation ended as never started", func() bool {
		var ops []api.Future
		f.ok(f.do("GET", "/futures?targetId="+lb.ID, ""), &ops)
		for _, op := range ops {
			if op.State != api.OpRunning {
				ended = op
			}
		}
		return ended.JobID != ""
	})
	if ended.Error == nil || ended.Error.Message != "Operation never started" {
		t.Fatalf("ended: %+v", ended)
	}
	f.ok(f.do("GET", "/load-balancers/"+lb.ID, ""), &lb)
	if lb.OperationID != "" || lb.State != api.LBStateNotProvisioned {
		t.Fatalf("the load balancer: %+v", lb)
	}
	st, err := js.Stream(context.Background(), protocol.StreamProvision)
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := st.Info(context.Background()); info.State.Msgs != 0 {
		t.Fatalf("%d requests were sent", info.State.Msgs)
	}
}

// TestALoadBalancerRacingAnInstanceDeletion: a save naming an instance
// and the instance's deletion, interleaved either way, never both succeed.
func TestALoadBalancerRacingAnInstanceDeletion(t *testing.T) {
	for _, tc := range []struct {
		name    string
		point   string // where the deletion waits
		machine bool   // the instance has a machine (the deletion is an operation)
	}{
		// The deletion claimed the instance; then the save: refused.
		{"the deletion first", "server/delete/instance-claimed", false},
		// The deletion looked at the load balancers, then the save, then
		// the claim: the deletion looks again and is refused.
		{"the save first", "server/act/op-recorded", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			paused, resume := make(chan struct{}), make(chan struct{})
			var once sync.Once
			f := start(t, servertest.WithConfig(func(c *server.Config) {
				c.LocalBackend = true
				c.Crash = func(point string) {
					if point == tc.point {
						once.Do(func() {
							close(paused)
							<-resume
						})
					}
				}
			}))
			vn, tpl, _ := f.fleet()
			kit := f.addImageWithKit("dss-race", "14.0.0")
			a := f.createInstance(instanceBody("a", vn.ID, tpl.ID, kit.ID))
			b := f.createInstance(instanceBody("b", vn.ID, tpl.ID, kit.ID))
			if tc.machine {
				machineRunning(t, f.env.Bus.JetStream(t), a.ID, "req-a")
			}
			var lb api.LoadBalancer
			f.ok(f.do("POST", "/load-balancers", lbBody("front", vn.ID, "b.example.com", b.ID)), &lb)
			deleted := make(chan response, 1)
			go func() {
				r, err := f.tryFrom("", "GET", "/instances/"+a.ID+"/actions/delete?force=True", "", f.env.Key.ID, f.env.Key.Secret)
				if err != nil {
					r = response{body: []byte(err.Error())}
				}
				deleted <- r
			}()
			select {
			case <-paused:
			case r := <-deleted:
				t.Fatalf("the deletion never reached %s: %d %s", tc.point, r.status, r.body)
			case <-time.After(30 * time.Second):
				t.Fatalf("the deletion never reached %s", tc.point)
			}
			saved := f.do("PUT", "/load-balancers/"+lb.ID, lbBody("front", vn.ID, "b.example.com", b.ID, "a.example.com", a.ID))
			close(resume)
			del := <-deleted
			if tc.machine {
				if saved.status != 200 || del.status != 409 {
					t.Fatalf("save %d %s; deletion %d %s", saved.status, saved.body, del.status, del.body)
				}
				f.ok(f.do("GET", "/instances/"+a.ID, ""), nil)
				return
			}
			if saved.status != 409 || del.status != 200 {
				t.Fatalf("save %d %s; deletion %d %s", saved.status, saved.body, del.status, del.body)
			}
			f.ok(f.do("GET", "/load-balancers/"+lb.ID, ""), &lb)
			if len(lb.Nodes) != 1 || lb.Nodes[0].InstanceID != b.ID {
				t.Fatalf("the refused save changed the load balancer: %+v", lb.Nodes)
			}
		})
	}
}

// TestADeletionThatDiesBeforeItLooksAtLoadBalancers: a save named the
// instance between the deletion's first look and its claim, and the server
// died right after the claim, before it looked again: the sweep looks
// before it sends the deletion, and fails it instead.
func TestADeletionThatDiesBeforeItLooksAtLoadBalancers(t *testing.T) {
	paused, resume, dead := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var pause, die sync.Once
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		c.LocalBackend, c.SweepInterval, c.RepublishAfter = true, 100*time.Millisecond, 300*time.Millisecond
		c.Crash = func(point string) {
			switch point {
			case "server/act/op-recorded":
				pause.Do(func() {
					close(paused)
					<-resume
				})
			case "server/act/instance-claimed":
				die.Do(func() { <-dead })
			}
		}
	}))
	t.Cleanup(func() { close(dead) })
	js := f.env.Bus.JetStream(t)
	vn, tpl, _ := f.fleet()
	kit := f.addImageWithKit("dss-race", "14.0.0")
	a := f.createInstance(instanceBody("a", vn.ID, tpl.ID, kit.ID))
	machineRunning(t, js, a.ID, "req-a")
	var lb api.LoadBalancer
	f.ok(f.do("POST", "/load-balancers", lbBody("front", vn.ID)), &lb)
	go f.send("GET", "/instances/"+a.ID+"/actions/delete?force=True")
	<-paused
	f.ok(f.do("PUT", "/load-balancers/"+lb.ID, lbBody("front", vn.ID, "a.example.com", a.ID)), nil)
	close(resume)
	var ended api.Future
	waitFor(t, "the deletion failed by the sweep", func() bool {
		var ops []api.Future
		f.ok(f.do("GET", "/futures?targetId="+a.ID, ""), &ops)
		for _, op := range ops {
			if op.Kind == "delete-instance" && op.State != api.OpRunning {
				ended = op
			}
		}
		return ended.JobID != ""
	})
	if ended.State != api.OpFailed || ended.Error == nil || !strings.Contains(ended.Error.DetailedMessage, lb.ID) {
		t.Fatalf("the deletion: %+v", ended)
	}
	st, err := js.Stream(context.Background(), protocol.StreamProvision)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.GetLastMsgForSubject(context.Background(), protocol.ProvisionSubject(a.ID, protocol.ProvisionDelete)); err == nil {
		t.Fatal("the deletion was sent")
	}
	f.ok(f.do("GET", "/instances/"+a.ID, ""), nil)
}
