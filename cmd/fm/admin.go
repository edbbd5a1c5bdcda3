package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/backup"
	"github.com/fleetmanager/fm/cli"
	"github.com/fleetmanager/fm/internal/startup"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// runAdmin is `fm admin backup|restore`: FM's own state, for upgrades and
// disaster recovery (docs/backup.md).
func runAdmin(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	const usage = "usage: fm admin backup --out FILE [--data DIR] | fm admin restore FILE [--data DIR]"
	if len(args) == 0 {
		return usageError{Err: errors.New(usage)}
	}
	switch args[0] {
	case "backup":
		return runBackup(ctx, args[1:], stdout, stderr)
	case "restore":
		return runRestore(ctx, args[1:], stdout, stderr)
	}
	return usageError{Err: fmt.Errorf("fm admin: unknown command %q; %s", args[0], usage)}
}

// busFlags say how an admin command reaches FM's bus: an external NATS, or
// the embedded one of the data folder (its address, CA and NATS authority).
type busFlags struct {
	data, url, creds, ca string
}

func (f *busFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.data, "data", "./.fm", "FM's data folder (env FM_DATA)")
	fs.StringVar(&f.url, "nats-url", "", "FM's NATS URL (default: the embedded bus of --data, as DATA/nats.addr says)")
	fs.StringVar(&f.creds, "nats-creds", "", "NATS credentials file for --nats-url (default: minted with DATA/nats-auth)")
	fs.StringVar(&f.ca, "nats-ca", "", "CA file to verify the NATS server's TLS certificate with (default DATA/tls/ca.pem if there)")
}

// connect reaches the bus of a running FM.
func (f *busFlags) connect(dir string, log zerolog.Logger) (*busConn, error) {
	url, ca := f.url, f.ca
	if ca == "" {
		if exists(filepath.Join(dir, "tls", "ca.pem")) {
			ca = filepath.Join(dir, "tls", "ca.pem")
		}
	}
	if url == "" {
		addr, err := os.ReadFile(filepath.Join(dir, "nats.addr"))
		if err != nil {
			return nil, usageError{Err: fmt.Errorf("no --nats-url and no embedded bus address in %s: %w", dir, err)}
		}
		scheme := "nats://"
		if ca != "" {
			scheme = "tls://"
		}
		url = scheme + strings.TrimSpace(string(addr))
	}
	sec := &security{caFile: ca}
	if f.creds == "" {
		s, err := folderAuthority(dir)
		if err != nil {
			return nil, err
		}
		sec.authority = s.authority
	}
	return externalBus(url, f.creds, "fm-admin", sec, log)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// keptFiles are the files of a data folder a backup holds: everything but
// the bus's store (which the streams are copied from) and the local
// backend's machines (their disks are not FM's state).
func keptFiles(dir string) (map[string][]byte, error) {
	files := map[string][]byte{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		if d.IsDir() {
			if rel == "jetstream" || rel == "local" {
				return filepath.SkipDir
			}
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(path)
		files[filepath.ToSlash(rel)] = b
		return err
	})
	if errors.Is(err, fs.ErrNotExist) {
		return files, nil
	}
	return files, err
}

func runBackup(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fm admin backup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("out", "", "the backup file to write (it holds FM's keys: keep it as safe as the data folder)")
	var bf busFlags
	bf.register(fs)
	if err := startup.ParseRoleFlags(fs, args); err != nil {
		return err
	}
	if *out == "" {
		return usageError{Err: errors.New("--out is required")}
	}
	dir, err := filepath.Abs(bf.data)
	if err != nil {
		return err
	}
	log := zerolog.New(stderr).Level(zerolog.WarnLevel)
	b, err := bf.connect(dir, log)
	if err != nil {
		return err
	}
	defer b.close()
	js, err := jetstream.New(b.nc)
	if err != nil {
		return err
	}
	files, err := keptFiles(dir)
	if err != nil {
		return fmt.Errorf("data folder: %w", err)
	}
	m, err := writeBackup(ctx, js, files, *out)
	if err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	msgs := 0
	for _, s := range m.Streams {
		msgs += s.Messages
	}
	fmt.Fprintf(stdout, "backed up %d streams (%d messages) and %d files of %s to %s\n", len(m.Streams), msgs, len(m.Files), dir, *out)
	return nil
}

// writeBackup writes the backup beside out and renames it into place once
// complete and on disk, so that out is never a partial backup.
func writeBackup(ctx context.Context, js jetstream.JetStream, files map[string][]byte, out string) (backup.Manifest, error) {
	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".*.tmp")
	if err != nil {
		return backup.Manifest{}, err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if err := tmp.Chmod(0o600); err != nil {
		return backup.Manifest{}, err
	}
	m, err := backup.Write(ctx, js, files, tmp)
	if err != nil {
		return m, err
	}
	if err := tmp.Sync(); err != nil {
		return m, err
	}
	if err := tmp.Close(); err != nil {
		return m, err
	}
	return m, os.Rename(tmp.Name(), out)
}

func runRestore(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fm admin restore", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var bf busFlags
	bf.register(fs)
	pos, err := cli.ParseFlags(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	if err != nil {
		return usageError{Err: err}
	}
	if len(pos) != 1 {
		return usageError{Err: errors.New("usage: fm admin restore FILE [--data DIR | --nats-url URL]")}
	}
	f, err := os.Open(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	m, files, err := backup.ReadFiles(f)
	if err != nil {
		return err
	}
	dir, err := filepath.Abs(bf.data)
	if err != nil {
		return err
	}
	log := zerolog.New(stderr).Level(zerolog.WarnLevel)
	var b *busConn
	if bf.url != "" {
		// An external NATS: its streams must be empty; the keys still go to
		// the data folder.
		if err := restoreFiles(dir, files); err != nil {
			return err
		}
		if b, err = bf.connect(dir, log); err != nil {
			return err
		}
	} else {
		if exists(filepath.Join(dir, "jetstream")) {
			return usageError{Err: fmt.Errorf("%s already has a bus store (jetstream): restore into a fresh data folder", dir)}
		}
		if err := restoreFiles(dir, files); err != nil {
			return err
		}
		if b, err = storeOnly(dir, log); err != nil {
			return err
		}
	}
	defer b.close()
	js, err := jetstream.New(b.nc)
	if err != nil {
		return err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	if _, err := backup.Restore(ctx, js, f); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	fmt.Fprintf(stdout, "restored %d streams and %d files (backup of %s) into %s; start fm server (or fm dev) with --data %s\n",
		len(m.Streams), len(m.Files), m.Created.Format(time.RFC3339), dir, dir)
	return nil
}

// restoreFiles writes the backup's files into the data folder (see
// backup.RestoreFiles); a folder in use is the operator's mistake.
func restoreFiles(dir string, files map[string][]byte) error {
	err := backup.RestoreFiles(dir, files)
	if errors.Is(err, backup.ErrFolderNotFresh) {
		return usageError{Err: err}
	}
	return err
}

// storeOnly starts the data folder's embedded bus listening nowhere, in
// operator mode when the folder holds a NATS authority, and connects to it.
func storeOnly(dir string, log zerolog.Logger) (*busConn, error) {
	sec, err := folderAuthority(dir)
	if err != nil {
		return nil, err
	}
	return startEmbeddedBus(dir, "", "fm-restore", true, sec, log)
}

// folderAuthority is the NATS authority the data folder holds (DATA/nats-auth),
// if any, without TLS.
func folderAuthority(dir string) (*security, error) {
	authority := filepath.Join(dir, "nats-auth")
	if !exists(authority) {
		return &security{}, nil
	}
	return openSecurity(dir, authority, false, tlsFlags{})
}
