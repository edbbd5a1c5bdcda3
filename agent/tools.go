package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
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
// when an archive, kept in /opt/fm-tools/<name>-<digest[:16]> and linked
// from /usr/local/bin/<name>. A tool already there at that digest is not
// fetched again. The folder is renamed into place whole and the link
// swapped by a rename: a kill leaves the old program or the new, and a
// temporary folder the next install of the tool removes, with the folders
// of its earlier digests. A /usr/local/bin/<name> that is not FM's link
// (the machine's own program) is left alone, and the install refused. It
// reports whether it changed anything.
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
	if cur, err := os.Readlink(link); err == nil {
		if !within(root, cur) {
			return false, fmt.Errorf("%w: /usr/local/bin/%s links to %s", errOwnProgram, name, cur)
		}
	} else if _, err := os.Lstat(link); err == nil {
		return false, fmt.Errorf("%w: /usr/local/bin/%s", errOwnProgram, name)
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return false, err
	}
	r.sweepTool(root, name, "", true)
	changed := false
	if b, err := os.ReadFile(filepath.Join(dir, ".complete")); err != nil || strings.TrimSpace(string(b)) != digest {
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
			err = tarball.Extract(f, tmp, tarball.Options{ConfineLinks: true, Folder: name + " archive", MaxBytes: maxToolUnpacked})
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
		changed = true
	}
	if cur, err := os.Readlink(link); err == nil && cur == program {
		r.sweepTool(root, name, filepath.Base(dir), false)
		return changed, nil
	}
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		return changed, err
	}
	tmpLink := link + ".fm-new"
	os.Remove(tmpLink)
	if err := os.Symlink(program, tmpLink); err != nil {
		return changed, err
	}
	if err := os.Rename(tmpLink, link); err != nil {
		os.Remove(tmpLink)
		return changed, err
	}
	r.sweepTool(root, name, filepath.Base(dir), false)
	return true, nil
}

// sweepTool removes what earlier installs of a tool left under root: with
// temps, the temporary folders of installs a kill cut short (one install
// runs at a time, under the machine lock); without, the folders of the
// tool's digests other than keep, once the link leads to keep.
func (r *actionRunner) sweepTool(root, name, keep string, temps bool) {
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		n := e.Name()
		var stale bool
		if temps {
			stale = strings.HasPrefix(n, "."+name+"-")
		} else if rest, ok := strings.CutPrefix(n, name+"-"); ok && n != keep {
			stale = len(rest) == 16 && isHex(rest)
		}
		if !stale {
			continue
		}
		if err := os.RemoveAll(filepath.Join(root, n)); err != nil {
			r.m.log.Warn().Err(err).Str("folder", n).Msg("an earlier tool folder is not removed")
		}
	}
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil
}

// errOwnProgram is a tool the machine has a program of its own for (the
// AWS CLI's installer links /usr/local/bin/aws): it is left alone.
var errOwnProgram = errors.New("the machine's own program")

// maxToolUnpacked bounds what a tool's archive unpacks to.
const maxToolUnpacked = 4 << 30

// fetchTool copies the tool's file to dst, checking its digest as it goes.
// A file:// URL must name a regular file (not a device or a pipe, which
// could block or never end), and the copy stops with ctx.
func (r *actionRunner) fetchTool(ctx context.Context, rawURL, digest, dst string) error {
	ctx, cancel := context.WithTimeout(ctx, toolTime)
	defer cancel()
	u, err := url.Parse(rawURL)
	if err != nil {
		return err
	}
	var body io.ReadCloser
	if u.Scheme == "file" {
		// Opening some devices does something: what is not a regular file
		// is not opened.
		if st, err := os.Stat(u.Path); err != nil || !st.Mode().IsRegular() {
			return fmt.Errorf("%s is not a regular file", u.Path)
		}
		f, err := os.OpenFile(u.Path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return err
		}
		if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
			f.Close()
			return fmt.Errorf("%s is not a regular file", u.Path)
		}
		body = f
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
	if err := writeStream(dst, io.TeeReader(io.LimitReader(ctxReader{ctx, body}, maxToolBytes+1), h)); err != nil {
		return err
	}
	if st, err := os.Stat(dst); err == nil && st.Size() > maxToolBytes {
		return fmt.Errorf("the file is larger than %d bytes", int64(maxToolBytes))
	}
	// The digest it has is not shown: a viewer would learn that of any
	// file the agent can read.
	if hex.EncodeToString(h.Sum(nil)) != digest {
		return errors.New("its SHA-256 is not the image's")
	}
	return nil
}

// ctxReader stops a copy once ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
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
		if errors.Is(err, errOwnProgram) {
			// Kept: the machine's own is what its administrator chose.
			missing = append(missing, n+" (the machine's own kept)")
			continue
		}
		if err != nil {
			return installed, missing, err
		}
		if did {
			installed = append(installed, n)
		}
	}
	return installed, missing, nil
}

// deprecatedPython installs the Python builds the flags ask for from those
// the image offers (its tools python3.6 to python3.8); a flag turned off
// uninstalls nothing, as in Dataiku's.
func (r *actionRunner) deprecatedPython(ctx context.Context, p *protocol.InstallDeprecatedPythonParams, tools map[string]protocol.ToolSource) actionResult {
	var want, lacking []string
	for _, f := range []struct {
		on   bool
		name string
	}{{p.InstallPy36, "python3.6"}, {p.InstallPy37, "python3.7"}, {p.InstallPy38, "python3.8"}} {
		if !f.on {
			continue
		}
		if _, ok := tools[f.name]; !ok {
			lacking = append(lacking, f.name)
		}
		want = append(want, f.name)
	}
	if len(lacking) > 0 {
		return unsupported("this image offers no %s build (an image's tools)", strings.Join(lacking, ", "))
	}
	if len(want) == 0 {
		return ok("no deprecated Python asked for")
	}
	installed, kept, err := r.installTools(ctx, tools, want...)
	if err != nil {
		return failed("", err)
	}
	msg := "installed " + strings.Join(installed, ", ")
	if len(installed) == 0 {
		msg = strings.Join(want, ", ") + " already installed"
	}
	if len(kept) > 0 {
		msg += "; not from the image: " + strings.Join(kept, ", ")
	}
	return ok("%s", msg)
}
