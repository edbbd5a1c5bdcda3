package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/tarball"
	"github.com/fleetmanager/fm/protocol"
)

// maxToolBytes bounds a tool's download: eksctl and kubectl are tens of
// MiB, a Python build a few hundred.
const maxToolBytes = 2 << 30

// toolTime bounds one tool's download.
const toolTime = 20 * time.Minute

// installTool puts the program an image offers on the machine: downloaded
// (or read, file://), its SHA-256 checked against the image's, unpacked
// when an archive, kept in /opt/fm-tools/<name>-<digest> and linked from
// /usr/local/bin/<name>. A tool already there at that digest is not
// fetched again (it reports false). The folder is renamed into place whole
// and the link swapped by a rename: a kill leaves the old program or the
// new, and a temporary folder the next run replaces.
func (r *actionRunner) installTool(ctx context.Context, name string, src protocol.ToolSource) (bool, error) {
	if err := protocol.ValidateTools(map[string]protocol.ToolSource{name: src}); err != nil {
		return false, err
	}
	digest := strings.ToLower(src.SHA256)
	root := r.m.rooted("opt", "fm-tools")
	dir := filepath.Join(root, name+"-"+digest[:16])
	binary := src.Binary
	if binary == "" {
		binary = name
	}
	program := filepath.Join(dir, filepath.FromSlash(binary))
	link := r.m.rooted("usr", "local", "bin", name)
	fetched := false
	if !isRegular(filepath.Join(dir, ".complete")) {
		if err := os.MkdirAll(root, 0o755); err != nil {
			return false, err
		}
		tmp, err := os.MkdirTemp(root, "."+name+"-")
		if err != nil {
			return false, err
		}
		defer os.RemoveAll(tmp)
		file := filepath.Join(tmp, ".download")
		if err := r.fetchTool(ctx, src.URL, digest, file); err != nil {
			return false, fmt.Errorf("%s: %w", name, err)
		}
		if src.IsArchive() {
			f, err := os.Open(file)
			if err != nil {
				return false, err
			}
			err = tarball.Extract(f, tmp, tarball.Options{ConfineLinks: true, Folder: name + " archive"})
			f.Close()
			if err != nil {
				return false, fmt.Errorf("%s: %w", name, err)
			}
			os.Remove(file)
		} else if err := os.Rename(file, filepath.Join(tmp, name)); err != nil {
			return false, err
		}
		if !isRegular(filepath.Join(tmp, filepath.FromSlash(binary))) {
			return false, fmt.Errorf("%s: the image's file has no %s", name, binary)
		}
		if err := os.Chmod(filepath.Join(tmp, filepath.FromSlash(binary)), 0o755); err != nil {
			return false, err
		}
		if err := os.WriteFile(filepath.Join(tmp, ".complete"), []byte(digest+"\n"), 0o644); err != nil {
			return false, err
		}
		if err := os.Chmod(tmp, 0o755); err != nil {
			return false, err
		}
		os.RemoveAll(dir) // an earlier run's, cut short before .complete
		if err := os.Rename(tmp, dir); err != nil {
			return false, err
		}
		fetched = true
	}
	if cur, err := os.Readlink(link); err == nil && cur == program {
		return fetched, nil
	}
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		return fetched, err
	}
	tmpLink := link + ".fm-new"
	os.Remove(tmpLink)
	if err := os.Symlink(program, tmpLink); err != nil {
		return fetched, err
	}
	if err := os.Rename(tmpLink, link); err != nil {
		os.Remove(tmpLink)
		return fetched, err
	}
	return true, nil
}

// fetchTool copies the tool's file to dst, checking its digest as it goes.
func (r *actionRunner) fetchTool(ctx context.Context, rawURL, digest, dst string) error {
	ctx, cancel := context.WithTimeout(ctx, toolTime)
	defer cancel()
	u, err := url.Parse(rawURL)
	if err != nil {
		return err
	}
	var body io.ReadCloser
	if u.Scheme == "file" {
		if body, err = os.Open(u.Path); err != nil {
			return err
		}
	} else {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
		if err != nil {
			return err
		}
		client := r.http
		if client == nil {
			client = http.DefaultClient
		}
		resp, err := client.Do(req)
		if err != nil {
			return fmt.Errorf("download: %w", err)
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return fmt.Errorf("download: %s answered %s", u.Host, resp.Status)
		}
		body = resp.Body
	}
	defer body.Close()
	h := sha256.New()
	if err := writeStream(dst, io.TeeReader(io.LimitReader(body, maxToolBytes+1), h)); err != nil {
		return err
	}
	if st, err := os.Stat(dst); err == nil && st.Size() > maxToolBytes {
		return fmt.Errorf("the file is larger than %d bytes", int64(maxToolBytes))
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != digest {
		return fmt.Errorf("SHA-256 is %s, the image says %s", got, digest)
	}
	return nil
}

func isRegular(p string) bool {
	st, err := os.Lstat(p)
	return err == nil && st.Mode().IsRegular()
}

// installTools installs the tools of names the image offers; those it does
// not are named in the message, not failed: an image may leave one to the
// machine's own packages.
func (r *actionRunner) installTools(ctx context.Context, tools map[string]protocol.ToolSource, names ...string) (installed, missing []string, err error) {
	for _, n := range names {
		src, ok := tools[n]
		if !ok {
			missing = append(missing, n)
			continue
		}
		did, err := r.installTool(ctx, n, src)
		if err != nil {
			return installed, missing, err
		}
		if did {
			installed = append(installed, n)
		}
	}
	return installed, missing, nil
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
