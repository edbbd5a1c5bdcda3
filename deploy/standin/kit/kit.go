// Package kit builds the DSS stand-in kit: an archive laid out like Dataiku's
// DSS kit (one top folder holding installer.sh) with the stand-in binary of
// one version. The Makefile (through mkkit), `fm dev` tests and agent tests
// build kits with it.
package kit

import (
	"archive/tar"
	"compress/gzip"
	_ "embed"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

//go:embed installer.sh
var installer []byte

//go:embed README-STANDIN.txt
var readme []byte

// Versions are the DSS versions the stand-in kit is built for by default.
var Versions = []string{"13.4.0", "14.0.0"}

// FileName is the archive name of a stand-in kit. FM registers any archive
// named dataiku-dss-<version>[-<flavour>].tar.gz as an image.
func FileName(version string) string { return "dataiku-dss-" + version + "-standin.tar.gz" }

var reKitName = regexp.MustCompile(`^dataiku-dss-(\d+\.\d+\.\d+)(?:-([a-z0-9]+))?\.tar\.gz$`)

// ParseFileName returns the version and flavour ("default" when absent) of a
// kit archive name, or ok false.
func ParseFileName(name string) (version, flavour string, ok bool) {
	m := reKitName.FindStringSubmatch(name)
	if m == nil {
		return "", "", false
	}
	if m[2] == "" {
		m[2] = "default"
	}
	return m[1], m[2], true
}

// Build compiles the stand-in for version from the module at moduleDir and
// writes its kit archive into outDir, returning the archive's path.
func Build(moduleDir, version, outDir string) (string, error) {
	if !regexp.MustCompile(`^\d+\.\d+\.\d+$`).MatchString(version) {
		return "", fmt.Errorf("kit: bad version %q", version)
	}
	if err := ReadSources(moduleDir); err != nil {
		return "", err
	}
	work, err := os.MkdirTemp("", "standin-kit-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	bin := filepath.Join(work, "dss-standin")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version="+version, "-o", bin, "./deploy/standin")
	cmd.Dir = moduleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("kit: build stand-in %s: %v: %s", version, err, out)
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return "", err
	}
	dst := filepath.Join(outDir, FileName(version))
	tmp := dst + ".tmp"
	if err := writeArchive(tmp, "dataiku-dss-"+version+"-standin", bin); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return dst, os.Rename(tmp, dst)
}

func writeArchive(path, top, bin string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	gz := gzip.NewWriter(f)
	tw := tar.NewWriter(gz)
	add := func(name string, mode int64, r io.Reader, size int64) error {
		if err := tw.WriteHeader(&tar.Header{Name: top + "/" + name, Mode: mode, Size: size, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := io.Copy(tw, r)
		return err
	}
	for _, dir := range []string{"", "bin/"} {
		if err := tw.WriteHeader(&tar.Header{Name: top + "/" + dir, Mode: 0o755, Typeflag: tar.TypeDir}); err != nil {
			return err
		}
	}
	if err := add("installer.sh", 0o755, strings.NewReader(string(installer)), int64(len(installer))); err != nil {
		return err
	}
	if err := add("README-STANDIN.txt", 0o644, strings.NewReader(string(readme)), int64(len(readme))); err != nil {
		return err
	}
	b, err := os.Open(bin)
	if err != nil {
		return err
	}
	defer b.Close()
	st, err := b.Stat()
	if err != nil {
		return err
	}
	if err := add("bin/dss-standin", 0o755, b, st.Size()); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := gz.Close(); err != nil {
		return err
	}
	return f.Close()
}

// ReadSources reads every source file of the module at moduleDir. A test that
// builds binaries with `go build` calls it so that Go's test cache, which
// records the files a test reads but not those a child process reads, reruns
// the test when the sources change.
func ReadSources(moduleDir string) error {
	return filepath.WalkDir(moduleDir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if path != moduleDir && (strings.HasPrefix(name, ".") || name == "bin" || name == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if strings.HasSuffix(name, ".go") || name == "go.mod" || name == "go.sum" || strings.HasSuffix(name, ".sh") {
			_, err := os.ReadFile(path)
			return err
		}
		return nil
	})
}
