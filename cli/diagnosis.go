package cli

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/client"
)

// runDiagnosis is `fm instance diagnosis ID`: collect a bundle (the
// collect-diagnosis action, its steps shown) and download it to a file, or
// download one collected before (--name), or list them (--list).
func runDiagnosis(ctx context.Context, env Env, c *client.Client, output, id, name, out string, list bool) error {
	base := "/instances/" + url.PathEscape(id) + "/diagnoses"
	if list {
		var ds []map[string]any
		if err := c.Do(ctx, http.MethodGet, base, nil, nil, &ds); err != nil {
			return err
		}
		if output == "json" {
			return printJSON(env.Stdout, ds)
		}
		return printTable(env.Stdout, []column{field("NAME", "name"), field("BYTES", "sizeBytes"), field("CREATED", "createdAt")}, ds)
	}
	var want struct {
		Object    string `json:"object"`
		SizeBytes int64  `json:"sizeBytes"`
		SHA256    string `json:"sha256"`
	}
	if name == "" {
		var f api.Future
		if err := c.Do(ctx, http.MethodGet, "/instances/"+url.PathEscape(id)+"/actions/collect-diagnosis", nil, nil, &f); err != nil {
			return err
		}
		f, err := c.Wait(ctx, f, time.Second, stepPrinter(env, output))
		if err != nil {
			return err
		}
		if err := json.Unmarshal(f.Result, &want); err != nil || !strings.HasPrefix(want.Object, id+"/") {
			return fmt.Errorf("operation %s names no bundle of %s: %s", f.JobID, id, printable(string(f.Result)))
		}
		name = strings.TrimPrefix(want.Object, id+"/")
	}
	if out == "" {
		out = "diagnosis-" + id + "-" + name
	}
	// Written beside the file and renamed once whole and checked: an
	// interrupted download leaves no file that looks like a bundle.
	tmp, err := os.CreateTemp(filepath.Dir(out), ".fm-diagnosis-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	sum := sha256.New()
	n, err := c.Download(ctx, base+"/"+url.PathEscape(name), io.MultiWriter(tmp, sum))
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if want.SHA256 != "" && (hex.EncodeToString(sum.Sum(nil)) != want.SHA256 || n != want.SizeBytes) {
		return fmt.Errorf("the bundle downloaded (%d bytes) is not the one collected (%d bytes, sha256 %s)", n, want.SizeBytes, want.SHA256)
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return err
	}
	if output == "json" {
		return printJSON(env.Stdout, map[string]any{"file": out, "name": name, "sizeBytes": n, "sha256": hex.EncodeToString(sum.Sum(nil))})
	}
	fmt.Fprintf(env.Stdout, "wrote %s (%d bytes): tar tzf %s\n", out, n, out)
	return nil
}
