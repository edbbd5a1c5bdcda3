package server

import (
	"testing"

	"github.com/fleetmanager/fm/protocol"
)

func TestPublicURL(t *testing.T) {
	tests := []struct {
		name  string
		host  string
		https *protocol.HTTPSStatus
		want  string
	}{
		{"plain", "dss.example.com", nil, "http://dss.example.com:10000"},
		{"https on 443", "dss.example.com", &protocol.HTTPSStatus{Port: 443, Serving: true}, "https://dss.example.com"},
		{"https on another port", "127.0.0.1", &protocol.HTTPSStatus{Port: 10008, Serving: true}, "https://127.0.0.1:10008"},
		{"https not serving yet", "10.0.0.5", &protocol.HTTPSStatus{Port: 443}, "http://10.0.0.5:10000"},
		{"IPv6", "2001:db8::1", &protocol.HTTPSStatus{Port: 443, Serving: true}, "https://[2001:db8::1]"},
		{"IPv6 plain", "2001:db8::1", nil, "http://[2001:db8::1]:10000"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := publicURL(tc.host, &protocol.DSSStatus{HTTPS: tc.https}, 10000); got != tc.want {
				t.Fatalf("publicURL = %q, want %q", got, tc.want)
			}
		})
	}
}
