package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

// The setup actions that run DSS's bin/dssadmin commands, once per DSS
// version each, and SETUP_K8S_AND_SPARK, which adds the configurations of
// Dataiku's EKS blueprint through the admin API.

// dssadminCommand is a command of bin/dssadmin a setup action runs once
// per DSS version.
type dssadminCommand struct {
	args []string
	// atStart: DSS takes what the command did when it starts, so that its
	// record's change restarts it (dssRecord.AtStart).
	atStart bool
	// asRoot runs it as the agent's account rather than DSS's.
	asRoot bool
	// dssStopped: DSS must not run while it does; a DSS that ran is
	// started again after it.
	dssStopped bool
}

func (c dssadminCommand) key() string { return strings.Join(c.args, " ") }

// oncePerVersion runs a dssadmin command unless the record says it ran for
// the DSS version installed (the base images, the graphics export and the
// integrations are DSS's own, redone after an upgrade). A kill between the
// command and the record runs the command again, which DSS's commands
// allow.
func (r *actionRunner) oncePerVersion(ctx context.Context, c dssadminCommand) (bool, string, error) {
	version, err := r.requireInstalled()
	if err != nil {
		return false, "", err
	}
	rec := r.m.loadRecord()
	if rec.Commands[c.key()] == version {
		return false, "", nil
	}
	stopped := false
	var out string
	if c.dssStopped && r.m.dssUp(ctx) {
		stopOut, _ := r.m.stopDSS(ctx) // it kills what does not stop
		out, stopped = stopOut, true
	}
	who := runAuto
	if c.asRoot {
		who = runAgent
	}
	cctx, cancel := context.WithTimeout(ctx, dssadminTime)
	cmdOut, err := r.m.runWith(cctx, nil, who, filepath.Join(r.m.dssDir, "bin", "dssadmin"), c.args...)
	cancel()
	out += cmdOut
	if err != nil {
		err = fmt.Errorf("dssadmin %s: %w", c.key(), err)
	} else {
		rec.Commands[c.key()] = version
		if c.atStart {
			rec.AtStart[c.key()] = version
		}
		err = r.m.saveRecord(rec)
	}
	// DSS runs again whatever the command did: a failed action leaves
	// DSS running. An agent stopping meanwhile leaves it to the next
	// start of the agent, which starts DSS.
	if stopped && ctx.Err() == nil {
		startOut, serr := r.m.startDSS(ctx)
		out += startOut
		if serr != nil && err == nil {
			err = fmt.Errorf("DSS did not start again after dssadmin %s: %w", c.key(), serr)
		}
	}
	return err == nil, out, err
}

// requireInstalled is the DSS version installed, or an error saying the
// action came too early.
func (r *actionRunner) requireInstalled() (string, error) {
	v, err := r.m.installedVersion()
	if err != nil || v == "" {
		return "", errors.New("DSS is not installed yet: give the action the stage after_install or later")
	}
	return v, nil
}

// dssadminTime bounds one dssadmin command: building a base image pulls and
// installs packages.
const dssadminTime = 45 * time.Minute

// commands runs dssadmin commands once per DSS version each, and words it.
func (r *actionRunner) commands(ctx context.Context, what string, cmds ...dssadminCommand) actionResult {
	var outs, ran []string
	for _, c := range cmds {
		did, out, err := r.oncePerVersion(ctx, c)
		outs = append(outs, out)
		if err != nil {
			return failed(strings.Join(outs, "\n"), err)
		}
		if did {
			ran = append(ran, c.key())
		}
	}
	if len(ran) == 0 {
		return ok("%s: already done for this DSS version", what)
	}
	return actionResult{status: protocol.StatusOK, message: what + ": dssadmin " + strings.Join(ran, "; dssadmin "), output: strings.Join(outs, "\n")}
}

// The dssadmin commands of the actions; the Spark integration comes before
// the Spark image, which is built from it.
var (
	graphicsExport   = dssadminCommand{args: []string{"install-graphics-export"}, atStart: true}
	sparkIntegration = dssadminCommand{args: []string{"install-spark-integration"}, atStart: true}
	containerImage   = dssadminCommand{args: []string{"build-base-image", "--type", "container-exec"}}
	sparkImage       = dssadminCommand{args: []string{"build-base-image", "--type", "spark"}}
)

// k8sAndSpark builds DSS's base images for containerized execution and
// Spark, installs the Spark integration, and gives DSS an eks-default
// containerized-execution configuration and an eks-default Spark one, the
// defaults when DSS has none. Configurations DSS already has by that name
// are left as they are: an administrator may have tuned them.
func (r *actionRunner) k8sAndSpark(ctx context.Context, id string, p *protocol.SetupK8sAndSparkParams, tools map[string]protocol.ToolSource) actionResult {
	installed, missing, err := r.installTools(ctx, tools, "kubectl", "eksctl", "aws")
	if err != nil {
		return failed("", err)
	}
	if p.UseHostIP {
		// DSS tells its containers to call back at DKU_BACKEND_EXT_HOST.
		ip, err := r.hostIP()
		if err != nil {
			return failed("", err)
		}
		if res := r.editDSSFile(ctx, id, []string{"bin", "env-site.sh"}, []string{"export DKU_BACKEND_EXT_HOST=" + ip}, ""); res.status == protocol.StatusFailed {
			return res
		}
	}
	res := r.commands(ctx, "Kubernetes and Spark", sparkIntegration, containerImage, sparkImage)
	if res.status == protocol.StatusFailed {
		return res
	}
	saved, err := r.changeGeneralSettings(ctx, func(s map[string]any) error {
		cs, err := object(s, "containerSettings")
		if err != nil {
			return err
		}
		if err := addConfig(cs, map[string]any{"name": eksConfig, "type": "KUBERNETES", "kubernetesNamespace": "default", "baseImageType": "EXEC"}); err != nil {
			return fmt.Errorf("containerSettings: %w", err)
		}
		if cs["defaultExecutionConfig"] == nil {
			cs["defaultExecutionConfig"] = eksConfig
		}
		ss, err := object(s, "sparkSettings")
		if err != nil {
			return err
		}
		if err := addConfig(ss, map[string]any{"name": eksConfig, "kubernetesExecution": true, "conf": []any{}}); err != nil {
			return fmt.Errorf("sparkSettings: %w", err)
		}
		return nil
	})
	if err != nil {
		return failed(res.output, err)
	}
	if saved {
		res.message += "; " + eksConfig + " execution configurations added"
	}
	if len(installed) > 0 {
		res.message += "; installed " + strings.Join(installed, ", ")
	}
	if len(missing) > 0 {
		res.message += "; not from the image: " + strings.Join(missing, ", ") + " (the machine's own, if any, is used)"
	}
	if p.UseHostIP {
		res.message += "; pods reach DSS at the host's IP"
	}
	return res
}

// eksConfig names the containerized-execution configuration of Dataiku's
// EKS blueprint.
const eksConfig = "eks-default"

// addConfig adds config to holder's executionConfigs unless one of its name
// is there.
func addConfig(holder map[string]any, config map[string]any) error {
	var list []any
	switch v := holder["executionConfigs"].(type) {
	case []any:
		list = v
	case nil:
	default:
		return errors.New("executionConfigs is not an array")
	}
	for _, c := range list {
		if m, ok := c.(map[string]any); ok && m["name"] == config["name"] {
			return nil
		}
	}
	holder["executionConfigs"] = append(list, config)
	return nil
}

// hostIP is the machine's address toward FM's bus: on EC2 its primary
// private address, which pods of an EKS cluster in its VPC reach. A bus on
// this host (a local machine) gives loopback: then the first other address.
func (r *actionRunner) hostIP() (string, error) {
	if u, err := url.Parse(r.m.cfg.NATSURL); err == nil && u.Host != "" {
		host := u.Host
		if _, _, err := net.SplitHostPort(host); err != nil {
			host = net.JoinHostPort(host, "4222")
		}
		// UDP: nothing is sent; the kernel picks the route's source.
		if c, err := net.Dial("udp", host); err == nil {
			ip := c.LocalAddr().(*net.UDPAddr).IP
			c.Close()
			if !ip.IsLoopback() && ip.To4() != nil {
				return ip.String(), nil
			}
		}
	}
	for _, ip := range machineAddresses(nil) {
		if ip.To4() != nil {
			return ip.String(), nil
		}
	}
	return "", errors.New("the machine has no IPv4 address but loopback")
}
