package archive

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
)

type store interface {
	Name() string
	Put(ctx context.Context, name string, r io.ReadSeeker) error
	Open(ctx context.Context, name string) (io.ReadCloser, error)
	Delete(ctx context.Context, name string) error
}

// TestStores runs the same checks on the object store and on S3 (moto).
func TestStores(t *testing.T) {
	ctx := context.Background()
	stores := map[string]func(t *testing.T) store{
		"object-store": func(t *testing.T) store {
			js := bustest.Run(t).JetStream(t)
			if err := bus.DefaultTopology().Declare(ctx, js); err != nil {
				t.Fatal(err)
			}
			st, err := NewObjectStore(ctx, js)
			if err != nil {
				t.Fatal(err)
			}
			return st
		},
		"s3": func(t *testing.T) store {
			m := mototest.Run(t)
			m.SetEnv(t)
			st, err := NewS3(ctx, S3Config{Bucket: "fm-snapshots", Prefix: "fm/", Region: mototest.Region, Endpoint: m.URL})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := st.client.(*s3.Client).CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("fm-snapshots")}); err != nil {
				t.Fatal(err)
			}
			return st
		},
	}
	for name, open := range stores {
		t.Run(name, func(t *testing.T) {
			st := open(t)
			if st.Name() != name {
				t.Fatalf("name %q", st.Name())
			}
			body := strings.Repeat("archive bytes ", 100000)
			if err := st.Put(ctx, "in-1/snap-1.tar.gz", strings.NewReader(body)); err != nil {
				t.Fatal(err)
			}
			rc, err := st.Open(ctx, "in-1/snap-1.tar.gz")
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(rc)
			rc.Close()
			if err != nil || string(got) != body {
				t.Fatalf("read back %d bytes, %v", len(got), err)
			}
			if _, err := st.Open(ctx, "in-1/nope.tar.gz"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("missing archive: %v", err)
			}
			if err := st.Delete(ctx, "in-1/snap-1.tar.gz"); err != nil {
				t.Fatal(err)
			}
			if err := st.Delete(ctx, "in-1/snap-1.tar.gz"); err != nil {
				t.Fatalf("deleting twice: %v", err)
			}
			if _, err := st.Open(ctx, "in-1/snap-1.tar.gz"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("deleted archive: %v", err)
			}
		})
	}
}
