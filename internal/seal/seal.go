// Package seal encrypts FM's secrets (AES-256-GCM) so that they are never
// stored, or sent on the bus, in clear: with the server's master key in the
// KV buckets, with an instance's own key between the server and its agent.
// A sealed value is bound to where it belongs (its object and field, named
// by the caller as associated data): it opens there and nowhere else, so a
// sealed value moved to another object or field is refused. It is a string,
// "fmsealed2:" and base64 of nonce and ciphertext; an empty value stays
// empty. Values sealed before the binding ("fmsealed1:") open anywhere; FM
// seals them bound when it next writes them. Only this module's packages may import it (it is internal).
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/fleetmanager/fm/internal/atomicfile"
)

const (
	prefix   = "fmsealed2:"
	prefixV1 = "fmsealed1:" // unbound
)

// ErrNotSealed is returned by Open for a value that is not sealed.
var ErrNotSealed = errors.New("value is not sealed")

// Box seals and opens values with one key.
type Box struct {
	aead cipher.AEAD
}

// New returns a box for a 32-byte key.
func New(key []byte) (*Box, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("seal: the key must be 32 bytes, not %d", len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &Box{aead: aead}, nil
}

// NewKey returns a new random 32-byte key.
func NewKey() []byte {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return k
}

// LoadOrCreateKey reads the key file at path (base64 of 32 bytes), creating
// it with mode 0600 if it does not exist.
func LoadOrCreateKey(path string) ([]byte, error) {
	k, err := LoadKey(path)
	if errors.Is(err, os.ErrNotExist) {
		k := NewKey()
		if err := atomicfile.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(k)+"\n"), 0o600); err != nil {
			return nil, fmt.Errorf("seal: write key: %w", err)
		}
		return k, nil
	}
	return k, err
}

// LoadKey reads the key file at path, which must exist (a role that only
// opens what the server sealed, such as the provisioner).
func LoadKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("seal: read key: %w", err)
	}
	k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(k) != 32 {
		return nil, fmt.Errorf("seal: %s does not hold a 32-byte key in base64", path)
	}
	return k, nil
}

// Seal seals plain for where it belongs (an object and a field, e.g.
// "fm_secrets/in-abc/adminAPIKey").
func (b *Box) Seal(plain, where string) string {
	if plain == "" {
		return ""
	}
	nonce := make([]byte, b.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return prefix + base64.RawStdEncoding.EncodeToString(b.aead.Seal(nonce, nonce, []byte(plain), []byte(where)))
}

// Open opens a value sealed for where (or sealed unbound, before the
// binding). A value that is not sealed gives ErrNotSealed.
func (b *Box) Open(sealed, where string) (string, error) {
	if sealed == "" {
		return "", nil
	}
	ad := []byte(where)
	rest, ok := strings.CutPrefix(sealed, prefix)
	if !ok {
		if rest, ok = strings.CutPrefix(sealed, prefixV1); !ok {
			return "", ErrNotSealed
		}
		ad = nil
	}
	raw, err := base64.RawStdEncoding.DecodeString(rest)
	if err != nil || len(raw) < b.aead.NonceSize() {
		return "", errors.New("seal: malformed sealed value")
	}
	plain, err := b.aead.Open(nil, raw[:b.aead.NonceSize()], raw[b.aead.NonceSize():], ad)
	if err != nil {
		return "", fmt.Errorf("seal: the value does not open with this key for %s", where)
	}
	return string(plain), nil
}

// IsSealed reports whether v is a sealed value.
func IsSealed(v string) bool { return strings.HasPrefix(v, prefix) || strings.HasPrefix(v, prefixV1) }
