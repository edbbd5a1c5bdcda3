package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

const kindImage = "image"

// listImages serves GET /images: the DSS versions this FM can deploy, newest
// first, each with at least id and label.
func (s *Server) listImages(r *http.Request) (any, error) {
	all := s.st.images.all()
	sort.SliceStable(all, func(i, j int) bool { return protocol.CompareVersions(all[i].DSSVersion, all[j].DSSVersion) > 0 })
	return all, nil
}

func (s *Server) getImage(r *http.Request) (any, error) {
	id := r.PathValue("id")
	im, ok := s.st.images.view(id)
	if !ok {
		return nil, notFound(kindImage, id)
	}
	return im, nil
}

func (s *Server) createImage(r *http.Request) (any, error) {
	var im api.Image
	if err := readJSON(r, &im); err != nil {
		return nil, err
	}
	if err := s.AddImage(r.Context(), &im); err != nil {
		return nil, err
	}
	return im, nil
}

// AddImage validates and stores a new image. It is how `fm dev` registers the
// images of its configuration.
func (s *Server) AddImage(ctx context.Context, im *api.Image) error {
	normalizeImage(im)
	if err := s.validateImage(ctx, im); err != nil {
		return err
	}
	err := s.st.images.insertAs(ctx, im.ID, im)
	if errors.Is(err, errExists) {
		return newAPIError(protocol.CodeAlreadyExists, "Image already exists", "image %q already exists; remove it first to replace it", im.ID)
	}
	return err
}

func (s *Server) deleteImage(r *http.Request) (any, error) {
	id := r.PathValue("id")
	im, err := deleteGuarded(r.Context(), s.st.images, id, func(ctx context.Context) ([]string, error) {
		return s.instancesWhere(ctx, func(in *api.Instance) bool { return in.ImageID == id })
	})
	return s.finishedOp(r, "delete-image", "image", id, map[string]any{"id": id, "label": im.Label}, err)
}

func normalizeImage(im *api.Image) {
	im.ID = trim(im.ID)
	im.DSSVersion = trim(im.DSSVersion)
	im.Label = trim(im.Label)
	if im.Label == "" && im.DSSVersion != "" {
		im.Label = "DSS " + im.DSSVersion
	}
	if im.Kit != nil && *im.Kit == (api.Kit{}) {
		im.Kit = nil
	}
	if im.AMIs == nil {
		im.AMIs = map[string]string{}
	}
}

func (s *Server) validateImage(ctx context.Context, im *api.Image) error {
	var c checker
	if c.required("id", im.ID) {
		c.match("id", im.ID, reImageID, "an image id (lower-case letters, digits, '.', '_' and '-', e.g. dss-14.0.0-default)")
	}
	c.label("label", im.Label)
	if c.required("dssVersion", im.DSSVersion) {
		c.match("dssVersion", im.DSSVersion, reVersion, "a DSS version (e.g. 14.0.0)")
	}
	if im.Kit == nil && len(im.AMIs) == 0 {
		c.fail("kit", "an image needs a kit (for the local backend) or at least one AMI (for EC2)")
	}
	if im.Kit != nil {
		k := protocol.KitSource{Path: im.Kit.Path, URL: im.Kit.URL, SHA256: im.Kit.SHA256, Object: im.Kit.Object}
		if err := k.Validate(); err != nil {
			c.fail("kit", "%s", strings.TrimPrefix(err.Error(), "kit: "))
		} else if k.Object != "" {
			if err := s.kitExists(ctx, k.Object); err != nil {
				c.fail("kit.object", "%v", err)
			}
		}
	}
	if err := protocol.ValidateTools(toolSources(im.Tools)); err != nil {
		c.fail("tools", "%s", strings.TrimPrefix(err.Error(), "tools: "))
	}
	regions := make([]string, 0, len(im.AMIs))
	for region := range im.AMIs {
		regions = append(regions, region)
	}
	sort.Strings(regions)
	for _, region := range regions {
		c.match("amis", region, reRegion, "an AWS region")
		c.match("amis."+region, im.AMIs[region], reAMI, "an AMI id (ami-…)")
	}
	return c.err(kindImage)
}

func (s *Server) kitExists(ctx context.Context, name string) error {
	store, err := s.js.ObjectStore(ctx, protocol.ObjectStoreKits)
	if err != nil {
		return fmt.Errorf("the kit store cannot be read: %w", err)
	}
	if _, err := store.GetInfo(ctx, name); errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("no kit named %q in %s", name, protocol.ObjectStoreKits)
	} else if err != nil {
		return fmt.Errorf("the kit store cannot be read: %w", err)
	}
	return nil
}

// toolSources are an image's tools as the agent takes them.
func toolSources(tools map[string]api.Tool) map[string]protocol.ToolSource {
	if len(tools) == 0 {
		return nil
	}
	out := make(map[string]protocol.ToolSource, len(tools))
	for name, t := range tools {
		out[name] = protocol.ToolSource{URL: t.URL, SHA256: strings.ToLower(t.SHA256), Binary: t.Binary}
	}
	return out
}
