// Package tarball writes a folder as a gzipped tar and extracts one into a
// folder, refusing entries that would land outside it: DSS kits on the
// agent, data volume snapshots on the local backend. Only this module may import
// it; it imports only the standard library.
package tarball

import (
	"archive/tar"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Write writes the folder dir (directories, regular files and symbolic
// links, with their modes and modification times) to w as a gzipped tar.
func Write(w io.Writer, dir string) error {
	zw := gzip.NewWriter(w)
	tw := tar.NewWriter(zw)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == dir {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if d.Type()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(path); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		hdr.Name = filepath.ToSlash(rel)
		if d.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(tw, f)
		return err
	})
	if err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

// Options say how Extract treats what it finds.
type Options struct {
	// ConfineLinks refuses symbolic links that point outside the folder (a
	// kit from elsewhere); without it links are restored as they were (a
	// snapshot of FM's own making).
	ConfineLinks bool
	// Folder names the folder in errors ("kit folder"; default "folder").
	Folder string
}

// Extract unpacks a gzipped tar into dir: directories, regular files (with
// their modes and modification times) and symbolic links. Every entry is
// written through an os.Root of dir, so that no name, link or sequence of
// them (a link, then a file through it) reaches outside dir: an entry that
// would is refused. Hard links, devices and the like are skipped.
func Extract(r io.Reader, dir string, opt Options) error {
	folder := opt.Folder
	if folder == "" {
		folder = "folder"
	}
	zr, err := gzip.NewReader(r)
	if err != nil {
		return fmt.Errorf("not a gzip archive: %w", err)
	}
	tr := tar.NewReader(zr)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	var links []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read archive: %w", err)
		}
		name := filepath.Clean(filepath.FromSlash(h.Name))
		if filepath.IsAbs(name) || name == ".." || strings.HasPrefix(name, ".."+string(filepath.Separator)) {
			return fmt.Errorf("archive entry %q leaves the %s", h.Name, folder)
		}
		if h.Typeflag == tar.TypeSymlink && opt.ConfineLinks {
			// As the link will be followed: from the folder it is made in,
			// through the links already there.
			out, err := leadsOutside(root, filepath.Dir(name)+string(filepath.Separator)+h.Linkname)
			if err != nil {
				return fmt.Errorf("archive link %q: %w", h.Name, err)
			}
			if out || filepath.IsAbs(h.Linkname) {
				return fmt.Errorf("archive link %q points outside the %s", h.Name, folder)
			}
			links = append(links, name)
		}
		if err := extractEntry(root, tr, h, name); err != nil {
			followed := name // a link's own name is not followed
			if h.Typeflag == tar.TypeSymlink {
				followed = filepath.Dir(name)
			}
			if out, _ := leadsOutside(root, followed); out {
				return fmt.Errorf("archive entry %q leads outside the %s through a link: %w", h.Name, folder, err)
			}
			return fmt.Errorf("archive entry %q: %w", h.Name, err)
		}
	}
	// A link that pointed inside when it was made may point outside through
	// a link made after it (b -> a/.., then a -> .).
	for _, name := range links {
		out, err := leadsOutside(root, name)
		if err != nil {
			return fmt.Errorf("archive link %q: %w", name, err)
		}
		if out {
			return fmt.Errorf("archive link %q points outside the %s", name, folder)
		}
	}
	return nil
}

// extractEntry writes one entry, named name inside root, from tr. The
// root refuses any step that leaves it (through "..", or a link).
func extractEntry(root *os.Root, tr *tar.Reader, h *tar.Header, name string) error {
	mode := fs.FileMode(h.Mode).Perm()
	switch h.Typeflag {
	case tar.TypeDir:
		return root.MkdirAll(name, mode|0o700)
	case tar.TypeReg:
		if err := root.MkdirAll(filepath.Dir(name), 0o755); err != nil {
			return err
		}
		out, err := root.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
		if err != nil {
			return err
		}
		if _, err := io.Copy(out, tr); err != nil {
			out.Close()
			return err
		}
		if err := out.Close(); err != nil {
			return err
		}
		_ = root.Chtimes(name, h.ModTime, h.ModTime)
	case tar.TypeSymlink:
		if err := root.MkdirAll(filepath.Dir(name), 0o755); err != nil {
			return err
		}
		return root.Symlink(h.Linkname, name)
	}
	return nil
}

// maxLinkHops is how many links one path may go through, as Linux allows.
const maxLinkHops = 40

// errLinkLoop is for a path that goes through too many links, as a loop of
// links does.
var errLinkLoop = errors.New("too many levels of symbolic links")

// leadsOutside says whether following path (relative to root) as the kernel
// would, one component at a time through the links there now, leads outside
// root: by "..", or through a link to an absolute path. A missing component
// is taken as a folder, which ".." leaves: nothing is followed there yet.
func leadsOutside(root *os.Root, path string) (bool, error) {
	var at []string // where the walk is, relative to root; never a link
	todo := strings.Split(filepath.ToSlash(path), "/")
	for hops := 0; len(todo) > 0; {
		c := todo[0]
		todo = todo[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(at) == 0 {
				return true, nil
			}
			at = at[:len(at)-1]
			continue
		}
		at = append(at, c)
		p := filepath.Join(at...)
		info, err := root.Lstat(p)
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			continue
		}
		if err != nil {
			return false, err
		}
		if info.Mode()&fs.ModeSymlink == 0 {
			continue
		}
		if hops++; hops > maxLinkHops {
			return false, errLinkLoop
		}
		target, err := root.Readlink(p)
		if err != nil {
			return false, err
		}
		if filepath.IsAbs(target) {
			return true, nil
		}
		at = at[:len(at)-1]
		todo = append(strings.Split(filepath.ToSlash(target), "/"), todo...)
	}
	return false, nil
}
