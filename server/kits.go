package server

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/internal/objects"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// reKitArchive is how FM recognises a DSS kit archive in a folder:
// dataiku-dss-<version>[-<flavour>].tar.gz, as Dataiku names its kits (the
// stand-in kit's flavour is "standin").
var reKitArchive = regexp.MustCompile(`^dataiku-dss-(\d+\.\d+\.\d+)(?:-([a-z0-9]+))?\.tar\.gz$`)

// RegisterKits uploads every kit archive of dir into the fm_kits object
// store (unless an identical one is there) and registers an image for each
// one that has none: id dss-<version>-<flavour>. It returns the ids of the
// images the kits provide. `fm dev` calls it at start.
func (s *Server) RegisterKits(ctx context.Context, dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("kits folder: %w", err)
	}
	store, err := s.js.ObjectStore(ctx, protocol.ObjectStoreKits)
	if err != nil {
		return nil, fmt.Errorf("kit store: %w", err)
	}
	var ids []string
	for _, e := range entries {
		m := reKitArchive.FindStringSubmatch(e.Name())
		if m == nil || e.IsDir() {
			continue
		}
		version, flavour := m[1], m[2]
		if flavour == "" {
			flavour = "default"
		}
		if err := uploadKit(ctx, s.js, store, filepath.Join(dir, e.Name())); err != nil {
			return ids, err
		}
		label := "DSS " + version
		if flavour == "standin" {
			label += " (stand-in)"
		} else if flavour != "default" {
			label += " (" + flavour + ")"
		}
		im := api.Image{ID: "dss-" + version + "-" + flavour, Label: label, DSSVersion: version,
			Kit: &api.Kit{Object: e.Name()}}
		if _, _, ok := s.st.images.get(im.ID); !ok {
			if err := s.AddImage(ctx, &im); err != nil {
				return ids, fmt.Errorf("register image %s: %w", im.ID, err)
			}
			s.log.Info().Str("image", im.ID).Str("kit", e.Name()).Msg("registered an image for a kit")
		}
		ids = append(ids, im.ID)
	}
	sort.Strings(ids)
	return ids, nil
}

// uploadKit puts the file into the store unless an object of that name has
// the same content, whole (an upload cut short can leave the description
// of the whole file without all of its chunks).
func uploadKit(ctx context.Context, js jetstream.JetStream, store jetstream.ObjectStore, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return fmt.Errorf("read kit %s: %w", path, err)
	}
	digest := "SHA-256=" + base64.URLEncoding.EncodeToString(h.Sum(nil))
	name := filepath.Base(path)
	info, err := store.GetInfo(ctx, name)
	if err == nil && info.Digest == digest {
		whole := objects.Complete(ctx, js, protocol.ObjectStoreKits, info)
		if whole == nil {
			return nil
		}
		if !errors.Is(whole, objects.ErrIncomplete) {
			return fmt.Errorf("kit store: %w", whole)
		}
	}
	if err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("kit store: %w", err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if _, err := objects.Put(ctx, store, jetstream.ObjectMeta{Name: name, Description: "DSS install kit"}, f, fi.Size()); err != nil {
		return fmt.Errorf("upload kit %s: %w", name, err)
	}
	return nil
}

// RegisterImages registers the images listed in a JSON file (an array of
// image objects, as POST /images takes them) that are not registered yet.
func (s *Server) RegisterImages(ctx context.Context, path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("images file: %w", err)
	}
	var images []api.Image
	if err := json.Unmarshal(b, &images); err != nil {
		return nil, fmt.Errorf("images file %s: %w", path, err)
	}
	var ids []string
	for i := range images {
		im := images[i]
		if _, _, ok := s.st.images.get(im.ID); !ok {
			if err := s.AddImage(ctx, &im); err != nil {
				return ids, fmt.Errorf("images file %s: image %d: %w", path, i, err)
			}
		}
		ids = append(ids, im.ID)
	}
	return ids, nil
}
