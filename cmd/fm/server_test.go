package main

import (
	"fmt"
	"testing"
)

func TestParsePrefixes(t *testing.T) {
	cases := []struct {
		in, want string
		bad      bool
	}{
		{"", "[]", false},
		{"10.0.0.0/16, 192.0.2.7", "[10.0.0.0/16 192.0.2.7/32]", false},
		{"10.0.3.4/16", "[10.0.0.0/16]", false},
		{"2001:db8::1", "[2001:db8::1/128]", false},
		{"::ffff:192.0.2.7", "[192.0.2.7/32]", false},
		{"10.0.0.0/16,lb.example.com", "", true},
		{"10.0.0.0/33", "", true},
		{"::ffff:10.0.0.0/104", "[10.0.0.0/8]", false},
		{"0.0.0.0/0", "", true},
		{"::/0", "", true},
	}
	for _, c := range cases {
		t.Run(c.in, func(t *testing.T) {
			got, err := parsePrefixes(c.in)
			if c.bad {
				if err == nil {
					t.Fatalf("%q accepted as %v", c.in, got)
				}
				return
			}
			if err != nil || fmt.Sprint(got) != c.want {
				t.Fatalf("%q: %v, %v; want %s", c.in, got, err, c.want)
			}
		})
	}
}
