package agent

import (
	"archive/tar"
	"archive/zip"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

// maxDriverBytes bounds one file of a JDBC driver: the largest drivers are
// tens of megabytes.
const maxDriverBytes = 512 << 20

// installJDBC downloads a JDBC driver (a jar, or an archive to take files
// from) into the DSS data directory (lib/jdbc unless subpathInDatadir says
// otherwise).
func (r *actionRunner) installJDBC(ctx context.Context, p *protocol.InstallJDBCDriverParams) actionResult {
	if _, err := r.requireInstalled(); err != nil {
		return failed("", err)
	}
	u, err := url.Parse(p.URL)
	if err != nil {
		return failed("", err)
	}
	if u.Scheme == "s3" || u.Scheme == "abs" {
		return unsupported("%s:// URLs need cloud storage credentials on the machine; use an http(s) or file URL", u.Scheme)
	}
	sub := "lib/jdbc"
	if p.SubpathInDatadir != nil && *p.SubpathInDatadir != "" {
		sub = *p.SubpathInDatadir
	}
	dest := filepath.Join(r.m.dssDir, filepath.FromSlash(path.Clean(sub)))
	if !within(r.m.dssDir, dest) {
		return failed("", fmt.Errorf("subpathInDatadir %q leaves the DSS data directory", sub))
	}
	if err := r.m.mkdirAll(ctx, dest, 0o755); err != nil {
		return failed("", err)
	}
	// Each file goes in as the DSS account would write it (filesFor): the
	// folder is that account's.
	put := func(name string, from io.Reader) error {
		b, err := io.ReadAll(io.LimitReader(from, maxDriverBytes+1))
		if err != nil {
			return err
		}
		if len(b) > maxDriverBytes {
			return fmt.Errorf("%s is larger than %d MiB", name, maxDriverBytes>>20)
		}
		return r.m.writeFile(ctx, filepath.Join(dest, name), b, 0o644)
	}
	tmp, err := os.CreateTemp("", "fm-jdbc-*")
	if err != nil {
		return failed("", err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if err := r.fetchURL(ctx, u, p, tmp); err != nil {
		return failed("", err)
	}
	name := path.Base(u.Path)
	var installed []string
	switch {
	case strings.HasSuffix(name, ".zip"):
		installed, err = extractZip(tmp.Name(), p.PathsInArchive, put)
	case strings.HasSuffix(name, ".tar.gz"), strings.HasSuffix(name, ".tgz"):
		installed, err = extractTarGz(tmp.Name(), p.PathsInArchive, put)
	default:
		if len(p.PathsInArchive) > 0 {
			return failed("", fmt.Errorf("pathsInArchive is set but %s is not a .zip, .tar.gz or .tgz archive", name))
		}
		if _, err = tmp.Seek(0, io.SeekStart); err == nil {
			err = put(name, tmp)
			installed = []string{name}
		}
	}
	if err != nil {
		return failed("", err)
	}
	if len(installed) == 0 {
		return failed("", fmt.Errorf("no file of %s matched pathsInArchive %v", name, p.PathsInArchive))
	}
	return ok("installed %s into %s", strings.Join(installed, ", "), sub)
}

func (r *actionRunner) fetchURL(ctx context.Context, u *url.URL, p *protocol.InstallJDBCDriverParams, out *os.File) error {
	if u.Scheme == "file" {
		in, err := os.Open(u.Path)
		if err != nil {
			return err
		}
		defer in.Close()
		_, err = io.Copy(out, in)
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	for k, v := range p.Headers {
		req.Header.Set(k, v)
	}
	if p.Username != nil && *p.Username != "" {
		pw := ""
		if p.Password != nil {
			pw = *p.Password
		}
		req.SetBasicAuth(*p.Username, pw)
	}
	resp, err := r.http.Do(req)
	if err != nil {
		return fmt.Errorf("download %s: %w", u.Redacted(), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("download %s: %s", u.Redacted(), resp.Status)
	}
	_, err = io.Copy(out, resp.Body)
	return err
}

// wanted reports whether an archive entry is to be installed: one named by
// patterns (exact paths or path.Match patterns), or any .jar without them.
func wanted(name string, patterns []string) bool {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if len(patterns) == 0 {
		return strings.HasSuffix(name, ".jar")
	}
	for _, p := range patterns {
		if ok, _ := path.Match(path.Clean(p), name); ok || path.Clean(p) == name {
			return true
		}
	}
	return false
}

func extractZip(archive string, patterns []string, put func(name string, r io.Reader) error) ([]string, error) {
	zr, err := zip.OpenReader(archive)
	if err != nil {
		return nil, fmt.Errorf("not a zip archive: %w", err)
	}
	defer zr.Close()
	var installed []string
	for _, f := range zr.File {
		if f.FileInfo().IsDir() || !wanted(f.Name, patterns) {
			continue
		}
		rc, err := f.Open()
		if err != nil {
			return nil, err
		}
		err = put(path.Base(f.Name), rc)
		rc.Close()
		if err != nil {
			return nil, err
		}
		installed = append(installed, path.Base(f.Name))
	}
	return installed, nil
}

func extractTarGz(archive string, patterns []string, put func(name string, r io.Reader) error) ([]string, error) {
	f, err := os.Open(archive)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		return nil, fmt.Errorf("not a gzip archive: %w", err)
	}
	tr := tar.NewReader(gz)
	var installed []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return installed, nil
		}
		if err != nil {
			return nil, err
		}
		if h.Typeflag != tar.TypeReg || !wanted(h.Name, patterns) {
			continue
		}
		if err := put(path.Base(h.Name), tr); err != nil {
			return nil, err
		}
		installed = append(installed, path.Base(h.Name))
	}
}
