package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/objects"
	"github.com/fleetmanager/fm/internal/tarball"
	"github.com/fleetmanager/fm/internal/transfer"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// kitObject is a kit being read from the kit store.
type kitObject interface {
	io.ReadCloser
	Info() *jetstream.ObjectInfo
}

// kitChunkWait bounds the wait for each part of a kit read from the kit
// store (objects.Open): the whole read has no bound, a kit is gigabytes.
const kitChunkWait = time.Minute

// kits fetches kit archives into the cache and extracts them.
type kits struct {
	m *machine
	// open opens an object of the kit store (objects.Open).
	open func(ctx context.Context, name string) (kitObject, error)
	http *http.Client
	// progressEvery is how often a download says how far it got (5 s).
	progressEvery time.Duration
}

// prepare makes the kit of src available on the machine and returns the path
// of its installer.sh. Its errors carry a code (stepError): Unavailable for
// what may pass (the bus, the object store or the download server away),
// which the caller retries; anything else is for good (a kit missing, a
// digest that does not match).
func (k *kits) prepare(ctx context.Context, src protocol.KitSource, report transfer.Func) (string, error) {
	if err := src.Validate(); err != nil {
		return "", &stepError{code: protocol.CodeInvalidArgument, err: err}
	}
	k.removeTemporaries()
	archive, err := k.fetch(ctx, src, report)
	if err != nil {
		return "", err
	}
	installer, err := k.extract(archive)
	if err != nil {
		return "", &stepError{code: protocol.CodeDataLoss, err: err}
	}
	return installer, nil
}

// removeTemporaries removes what a kit fetch killed midway left: a partial
// download in the cache (writeStream's ".<name>.<random>", the cache's only
// hidden files) and a partial extraction (".extract-*"), each up to the
// kit's size. Kit fetches run one at a time (under the machine), so none
// is in use.
func (k *kits) removeTemporaries() {
	for _, pattern := range []string{filepath.Join(k.m.kitCache, ".*"), filepath.Join(k.m.kitRoot, ".extract-*")} {
		stale, _ := filepath.Glob(pattern)
		for _, p := range stale {
			if err := os.RemoveAll(p); err != nil {
				k.m.log.Warn().Err(err).Str("path", p).Msg("a kit fetch's leftover could not be removed")
				continue
			}
			k.m.log.Info().Str("path", p).Msg("an interrupted kit fetch's leftover was removed")
		}
	}
}

// kitError gives a fetch error its code.
func kitError(code protocol.Code, format string, args ...any) error {
	return &stepError{code: code, err: fmt.Errorf(format, args...)}
}

// fetch returns the path of the archive, downloading it into the cache if
// needed, and checks its digest when one is known.
func (k *kits) fetch(ctx context.Context, src protocol.KitSource, report transfer.Func) (string, error) {
	if err := os.MkdirAll(k.m.kitCache, 0o755); err != nil {
		return "", kitError(protocol.CodeInternal, "kit cache: %w", err)
	}
	switch {
	case src.Path != "":
		if _, err := os.Stat(src.Path); err != nil {
			return "", kitError(protocol.CodeNotFound, "kit: %w", err)
		}
		if src.SHA256 != "" {
			if err := checkDigest(src.Path, src.SHA256); err != nil {
				return "", kitError(protocol.CodeDataLoss, "%w", err)
			}
		}
		return src.Path, nil
	case src.URL != "":
		dst := filepath.Join(k.m.kitCache, strings.ToLower(src.SHA256)+".tar.gz")
		if checkDigest(dst, src.SHA256) == nil {
			return dst, nil
		}
		if err := k.download(ctx, src.URL, dst, report); err != nil {
			return "", err
		}
		if err := checkDigest(dst, src.SHA256); err != nil {
			os.Remove(dst)
			return "", kitError(protocol.CodeDataLoss, "%w", err)
		}
		return dst, nil
	default:
		dst := filepath.Join(k.m.kitCache, "object-"+src.Object)
		obj, err := k.open(ctx, src.Object)
		switch {
		case errors.Is(err, jetstream.ErrBucketNotFound):
			return "", kitError(protocol.CodeNotFound, "kit store %s: %w", protocol.ObjectStoreKits, err)
		case errors.Is(err, jetstream.ErrObjectNotFound):
			return "", kitError(protocol.CodeNotFound, "kit %q is not in %s: put it there (fm dev's kits folder, or nats object put %s FILE)",
				src.Object, protocol.ObjectStoreKits, protocol.ObjectStoreKits)
		case errors.Is(err, objects.ErrIncomplete):
			// An upload cut short: the next one (fm dev uploads its kits at
			// every start) mends it, so it is waited for until the deadline.
			return "", kitError(protocol.CodeUnavailable, "kit %q: %w; put it there again (fm dev's kits folder, or nats object put %s FILE)",
				src.Object, err, protocol.ObjectStoreKits)
		case err != nil:
			return "", kitError(protocol.CodeUnavailable, "kit %q from %s: %w", src.Object, protocol.ObjectStoreKits, err)
		}
		defer obj.Close()
		info := obj.Info()
		if sameDigest(dst, info.Digest) {
			return dst, nil
		}
		// The object's size and digest are checked as it is read.
		if err := writeStream(dst, transfer.Reader(obj, int64(info.Size), k.progressEvery, report)); errors.Is(err, objects.ErrCorrupt) {
			return "", kitError(protocol.CodeDataLoss, "kit %q: %w", src.Object, err)
		} else if err != nil {
			return "", kitError(protocol.CodeUnavailable, "kit %q: %w", src.Object, err)
		}
		return dst, nil
	}
}

func (k *kits) download(ctx context.Context, url, dst string, report transfer.Func) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return kitError(protocol.CodeInvalidArgument, "kit url: %w", err)
	}
	resp, err := k.http.Do(req)
	if err != nil {
		return kitError(protocol.CodeUnavailable, "download kit: %w", err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return kitError(protocol.CodeUnavailable, "download kit: %s answered %s", url, resp.Status)
	case resp.StatusCode != http.StatusOK:
		return kitError(protocol.CodeNotFound, "download kit: %s answered %s", url, resp.Status)
	}
	if err := writeStream(dst, transfer.Reader(resp.Body, resp.ContentLength, k.progressEvery, report)); err != nil {
		return kitError(protocol.CodeUnavailable, "download kit: %w", err)
	}
	return nil
}

// writeStream copies r to a temporary file and renames it to dst.
func writeStream(dst string, r io.Reader) error {
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, r); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}

func fileSHA256(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

// checkDigest fails unless path has the SHA-256 want (hex).
func checkDigest(path, want string) error {
	sum, err := fileSHA256(path)
	if err != nil {
		return fmt.Errorf("kit: %w", err)
	}
	if got := hex.EncodeToString(sum); !strings.EqualFold(got, want) {
		return fmt.Errorf("kit %s: SHA-256 is %s, the image says %s", filepath.Base(path), got, want)
	}
	return nil
}

// sameDigest reports whether path exists with the object-store digest
// ("SHA-256=<base64url>").
func sameDigest(path, objectDigest string) bool {
	want, err := jetstream.DecodeObjectDigest(objectDigest)
	if err != nil {
		return false
	}
	got, err := fileSHA256(path)
	return err == nil && string(got) == string(want)
}

// extract unpacks a kit archive under the kit root, once per archive
// content, and returns its installer.sh.
func (k *kits) extract(archive string) (string, error) {
	sum, err := fileSHA256(archive)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(k.m.kitRoot, hex.EncodeToString(sum)[:16])
	if installer, err := findInstaller(dir); err == nil {
		return installer, nil
	}
	if err := os.MkdirAll(k.m.kitRoot, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(k.m.kitRoot, ".extract-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	if err := untar(archive, tmp); err != nil {
		return "", fmt.Errorf("kit %s: %w", filepath.Base(archive), err)
	}
	if _, err := findInstaller(tmp); err != nil {
		return "", fmt.Errorf("kit %s: %w", filepath.Base(archive), err)
	}
	// MkdirTemp made it private; the installer runs as the DSS user.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", err
	}
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	return findInstaller(dir)
}

// findInstaller finds installer.sh at the top of dir or in its one top
// folder, as DSS kits have it.
func findInstaller(dir string) (string, error) {
	if p := filepath.Join(dir, "installer.sh"); fileExists(p) {
		return p, nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		if p := filepath.Join(dir, e.Name(), "installer.sh"); e.IsDir() && fileExists(p) {
			return p, nil
		}
	}
	return "", errors.New("the kit has no installer.sh")
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

// untar unpacks a .tar.gz into dir, refusing entries and links that would
// lead outside it.
func untar(archive, dir string) error {
	f, err := os.Open(archive)
	if err != nil {
		return err
	}
	defer f.Close()
	return tarball.Extract(f, dir, tarball.Options{ConfineLinks: true, Folder: "kit folder"})
}
