// Command mkkit builds DSS stand-in kits (see package kit):
//
//	go run ./deploy/standin/mkkit -out bin/kits [-version 14.0.0]...
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/fleetmanager/fm/deploy/standin/kit"
)

func main() {
	out := flag.String("out", "bin/kits", "output folder")
	versions := flag.String("versions", strings.Join(kit.Versions, ","), "comma-separated DSS versions")
	flag.Parse()
	for _, v := range strings.Split(*versions, ",") {
		path, err := kit.Build(".", strings.TrimSpace(v), *out)
		if err != nil {
			fmt.Fprintln(os.Stderr, "mkkit:", err)
			os.Exit(1)
		}
		fmt.Println(path)
	}
}
