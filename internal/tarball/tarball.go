// Package tarball writes a folder as a compressed tar, gzip or another
// Codec (internal/tarball/tarzstd), and extracts one into a folder,
// refusing entries that would land outside it: DSS kits on the agent, data
// volume snapshots on the local backend (LiveArchive). Only this module may
// import it; it imports the standard library and golang.org/x/sys/unix (to
// walk a folder without following links), so that what reads only gzipped
// kits (the slim agent) links no other compressor.
package tarball

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// Codec is a compression of the tar: its file name extension, the first
// bytes of what it writes, and how to write and read it.
type Codec struct {
	Name  string // "gzip", in errors
	Ext   string // ".tar.gz"
	Magic []byte
	// NewWriter compresses into w; closing it finishes the stream.
	NewWriter func(w io.Writer) (io.WriteCloser, error)
	// NewReader decompresses r; release frees what it holds.
	NewReader func(r io.Reader) (_ io.Reader, release func(), _ error)
}

// Gzip is what DSS kits are, and snapshots FM took before zstd.
var Gzip = Codec{
	Name:      "gzip",
	Ext:       ".tar.gz",
	Magic:     []byte{0x1f, 0x8b},
	NewWriter: func(w io.Writer) (io.WriteCloser, error) { return gzip.NewWriter(w), nil },
	NewReader: func(r io.Reader) (io.Reader, func(), error) {
		zr, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, err
		}
		return zr, func() {}, nil
	},
}

// decompress reads r's compressed tar, in whichever of codecs its first
// bytes say.
func decompress(r io.Reader, codecs []Codec) (io.Reader, func(), error) {
	br := bufio.NewReader(r)
	names := make([]string, len(codecs))
	for i, c := range codecs {
		names[i] = c.Name
		head, _ := br.Peek(len(c.Magic))
		if !bytes.Equal(head, c.Magic) {
			continue
		}
		zr, release, err := c.NewReader(br)
		if err != nil {
			return nil, nil, fmt.Errorf("not a %s archive: %w", names[i], err)
		}
		return zr, release, nil
	}
	return nil, nil, fmt.Errorf("not a %s archive", strings.Join(names, " or "))
}

// Options say how Extract treats what it finds.
type Options struct {
	// ConfineLinks refuses symbolic links that point outside the folder (a
	// kit from elsewhere); without it links are restored as they were (a
	// snapshot of FM's own making).
	ConfineLinks bool
	// Folder names the folder in errors ("kit folder"; default "folder").
	Folder string
	// Codecs are the compressions the archive may be in, told apart by
	// their first bytes; none means gzip only.
	Codecs []Codec
	// Snapshot says the archive is one of FM's own snapshots, which may
	// hold deletions (Writer.Deleted; refused in anything else) and whose
	// folders get the mode of their last entry.
	Snapshot bool
	// MaxBytes, if set, bounds the archive's unpacked size: an archive of
	// elsewhere's making (a tool) cannot fill the disk.
	MaxBytes int64
}

// errTooLarge is an archive that unpacks to more than MaxBytes.
var errTooLarge = errors.New("the archive unpacks to more than its limit")

// capped reads at most left bytes of r, then fails.
type capped struct {
	r    io.Reader
	left int64
}

func (c *capped) Read(p []byte) (int, error) {
	if c.left <= 0 {
		return 0, errTooLarge
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	return n, err
}

// Extract unpacks a compressed tar (gzip, or one of opt.Codecs, told by
// its first bytes) into dir: directories, regular files (with
// their modes and modification times) and symbolic links. Every entry is
// written through an os.Root of dir, so that no name, link or sequence of
// them (a link, then a file through it) reaches outside dir: an entry that
// would is refused. Hard links, devices and the like are skipped.
func Extract(r io.Reader, dir string, opt Options) error {
	folder := opt.Folder
	if folder == "" {
		folder = "folder"
	}
	codecs := opt.Codecs
	if len(codecs) == 0 {
		codecs = []Codec{Gzip}
	}
	zr, done, err := decompress(r, codecs)
	if err != nil {
		return err
	}
	defer done()
	var src io.Reader = zr
	if opt.MaxBytes > 0 {
		src = &capped{r: zr, left: opt.MaxBytes}
	}
	tr := tar.NewReader(src)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	var links []string
	var written int64                    // with MaxBytes: the sizes of the entries so far
	dirModes := map[string]fs.FileMode{} // snapshots: applied last, deepest first
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
		if h.PAXRecords[deletedKey] == "1" {
			if !opt.Snapshot {
				return fmt.Errorf("archive entry %q deletes: only FM's snapshots may", h.Name)
			}
			if err := removeNoFollow(root, name); err != nil {
				return fmt.Errorf("archive entry %q (deleted): %w", h.Name, err)
			}
			for d := range dirModes {
				if d == name || strings.HasPrefix(d, name+string(filepath.Separator)) {
					delete(dirModes, d)
				}
			}
			continue
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
		if opt.MaxBytes > 0 {
			// What an entry writes is its size, holes of a sparse file
			// included, which the stream does not carry.
			if written += h.Size; h.Size < 0 || written > opt.MaxBytes {
				return fmt.Errorf("archive entry %q: %w", h.Name, errTooLarge)
			}
		}
		if err := extractEntry(root, tr, h, name, opt.Snapshot); err != nil {
			followed := name // a link's own name is not followed
			if h.Typeflag == tar.TypeSymlink {
				followed = filepath.Dir(name)
			}
			if out, _ := leadsOutside(root, followed); out {
				return fmt.Errorf("archive entry %q leads outside the %s through a link: %w", h.Name, folder, err)
			}
			return fmt.Errorf("archive entry %q: %w", h.Name, err)
		}
		if opt.Snapshot {
			delete(dirModes, name)
			if h.Typeflag == tar.TypeDir {
				dirModes[name] = exactMode(h)
			}
		}
	}
	// A folder is made writable by its owner while it is filled; in a
	// snapshot it gets its own mode once nothing more goes in it (not under
	// the umask, nor with the owner's write added), what it holds first.
	names := slices.Collect(maps.Keys(dirModes))
	slices.SortFunc(names, func(a, b string) int {
		return strings.Count(b, string(filepath.Separator)) - strings.Count(a, string(filepath.Separator))
	})
	for _, d := range names {
		if err := root.Chmod(d, dirModes[d]); err != nil {
			return fmt.Errorf("archive folder %q: %w", d, err)
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

// extractEntry writes one entry, named name inside root, from tr,
// replacing what an earlier entry of the same name made. The root refuses
// any step that leaves it (through "..", or a link).
func extractEntry(root *os.Root, tr *tar.Reader, h *tar.Header, name string, exactModes bool) error {
	mode := fs.FileMode(h.Mode).Perm()
	switch h.Typeflag {
	case tar.TypeDir:
		if err := clearFor(root, name, true); err != nil {
			return err
		}
		return root.MkdirAll(name, mode|0o700)
	case tar.TypeReg:
		if err := root.MkdirAll(filepath.Dir(name), 0o755); err != nil {
			return err
		}
		if err := clearFor(root, name, false); err != nil {
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
		if exactModes { // not under the umask, with setgid and sticky bits
			if err := root.Chmod(name, exactMode(h)); err != nil {
				return err
			}
		}
		_ = root.Chtimes(name, h.ModTime, h.ModTime)
	case tar.TypeSymlink:
		if err := root.MkdirAll(filepath.Dir(name), 0o755); err != nil {
			return err
		}
		if err := clearFor(root, name, false); err != nil {
			return err
		}
		return root.Symlink(h.Linkname, name)
	}
	return nil
}

// exactMode is an entry's permissions with its setuid, setgid and sticky
// bits.
func exactMode(h *tar.Header) fs.FileMode {
	return h.FileInfo().Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
}

// clearFor removes what is at name, unless it is a folder and keepDir (an
// entry about to make a folder there): a file or link is made anew, so with
// the mode a first one gets, and a link is never written through.
func clearFor(root *os.Root, name string, keepDir bool) error {
	info, err := root.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if keepDir && info.IsDir() {
		return nil
	}
	return root.RemoveAll(name)
}

// removeNoFollow removes name and what is under it, as the entry of that
// path without following a link on the way: if a folder on the way is a
// link or not a folder, there is no such entry, and nothing is removed
// (not what the link leads to).
func removeNoFollow(root *os.Root, name string) error {
	if name == "." {
		return errors.New("the folder itself cannot be deleted")
	}
	// From the top down, so that each Lstat goes only through folders
	// already found to be folders.
	parts := strings.Split(name, string(filepath.Separator))
	for i := 1; i < len(parts); i++ {
		info, err := root.Lstat(filepath.Join(parts[:i]...))
		if errors.Is(err, fs.ErrNotExist) || err == nil && !info.IsDir() {
			return nil
		}
		if err != nil {
			return err
		}
	}
	return root.RemoveAll(name)
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
