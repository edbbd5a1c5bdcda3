package protocol

import (
	"crypto/rand"
	"encoding/base32"
)

// idEncoding is lower-case base32 without padding: ids are valid subject
// tokens, KV keys, DNS labels and file names.
var idEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// NewID returns prefix-<16 random characters> (80 bits), the form of every
// id FM mints for commands, events and requests.
func NewID(prefix string) string {
	b := make([]byte, 10)
	if _, err := rand.Read(b); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return prefix + "-" + idEncoding.EncodeToString(b)
}
