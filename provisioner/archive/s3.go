package archive

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
)

// s3API is the part of S3 the store uses, so that AWS, an S3-compatible
// store and moto run the same code.
type s3API interface {
	PutObject(ctx context.Context, in *s3.PutObjectInput, opts ...func(*s3.Options)) (*s3.PutObjectOutput, error)
	GetObject(ctx context.Context, in *s3.GetObjectInput, opts ...func(*s3.Options)) (*s3.GetObjectOutput, error)
	DeleteObject(ctx context.Context, in *s3.DeleteObjectInput, opts ...func(*s3.Options)) (*s3.DeleteObjectOutput, error)
}

var _ s3API = (*s3.Client)(nil)

// S3Config configures an S3 snapshot store.
type S3Config struct {
	// Bucket must exist; FM does not create it.
	Bucket string
	// Prefix is put before every archive's name ("fm/snapshots/").
	Prefix string
	Region string
	// Endpoint is an S3-compatible store's URL (path-style addressing);
	// empty means AWS's.
	Endpoint string
}

// S3 keeps archives as objects of a bucket. It authenticates with the
// standard AWS chain (environment, shared config, instance role).
type S3 struct {
	cfg    S3Config
	client s3API
}

// NewS3 checks the configuration and builds the client; it does not call S3.
func NewS3(ctx context.Context, cfg S3Config) (*S3, error) {
	if cfg.Bucket == "" {
		return nil, errors.New("snapshot store: an S3 bucket is required")
	}
	opts := []func(*config.LoadOptions) error{config.WithRetryMaxAttempts(5)}
	if cfg.Region != "" {
		opts = append(opts, config.WithRegion(cfg.Region))
	}
	if cfg.Endpoint != "" {
		opts = append(opts, config.WithBaseEndpoint(cfg.Endpoint))
	}
	awsCfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("snapshot store: %w", err)
	}
	client := s3.NewFromConfig(awsCfg, func(o *s3.Options) { o.UsePathStyle = cfg.Endpoint != "" })
	return &S3{cfg: cfg, client: client}, nil
}

// Name is the store's name in snapshot records.
func (s *S3) Name() string { return "s3" }

func (s *S3) key(name string) string { return s.cfg.Prefix + name }

// Put stores an archive under name, replacing one of that name.
func (s *S3) Put(ctx context.Context, name string, r io.ReadSeeker) error {
	_, err := s.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(s.key(name)),
		Body: r, ContentType: aws.String(contentType(name))})
	if err != nil {
		return fmt.Errorf("store archive s3://%s/%s: %w", s.cfg.Bucket, s.key(name), err)
	}
	return nil
}

// contentType is an archive's media type, told by its name (snapshots taken
// before zstd are gzipped tars).
func contentType(name string) string {
	if strings.HasSuffix(name, ".zst") {
		return "application/zstd"
	}
	return "application/gzip"
}

// Open reads an archive.
func (s *S3) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(s.key(name))})
	var (
		missing *types.NoSuchKey
		status  interface{ HTTPStatusCode() int }
	)
	if errors.As(err, &missing) || errors.As(err, &status) && status.HTTPStatusCode() == 404 {
		return nil, fmt.Errorf("%w: s3://%s/%s", ErrNotFound, s.cfg.Bucket, s.key(name))
	}
	if err != nil {
		return nil, fmt.Errorf("read archive s3://%s/%s: %w", s.cfg.Bucket, s.key(name), err)
	}
	return out.Body, nil
}

// Delete removes an archive; S3 answers the same for one already gone.
func (s *S3) Delete(ctx context.Context, name string) error {
	if _, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(s.key(name))}); err != nil {
		return fmt.Errorf("delete archive s3://%s/%s: %w", s.cfg.Bucket, s.key(name), err)
	}
	return nil
}
