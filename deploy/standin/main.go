// Command dss-standin is the DSS STAND-IN: a small program that honours the
// interface of Dataiku's DSS install kit so that FM's embedded default and
// its tests can run a real process where DSS would run. It is not DSS and
// does nothing DSS does beyond that interface.
//
// The kit (built by `make kits`) is an archive holding installer.sh and this
// binary. Through them it offers what FM's agent relies on:
//
//	installer.sh -d DATA_DIR -p PORT -t NODE_TYPE [-l LICENSE]   install
//	installer.sh -d DATA_DIR -u -y                                upgrade in place
//	DATA_DIR/bin/dss start|stop|status|restart                    control
//	DATA_DIR/bin/dsscli users-list|user-edit|api-key-create|…     administration
//	DATA_DIR/bin/env-site.sh, DATA_DIR/install.ini                environment, settings
//	DATA_DIR/dss-version.json                                     installed version
//
// and an HTTP service on the base port. Its version is set at build time
// (-ldflags "-X main.version=14.0.0"); versions from 14 on keep users in a
// JSON file, older ones in a text file, and the upgrade migrates them.
package main

import (
	"fmt"
	"os"
)

// version is the DSS version this build stands in for.
var version = "0.0.0"

func main() { os.Exit(run(os.Args[1:])) }

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: dss-standin install|upgrade|serve|ctl|cli|version …")
		return 2
	}
	var err error
	switch args[0] {
	case "install":
		err = cmdInstall(args[1:])
	case "upgrade":
		err = cmdUpgrade(args[1:])
	case "serve":
		err = cmdServe(args[1:])
	case "ctl":
		return cmdControl(args[1:])
	case "cli":
		err = cmdCLI(args[1:], os.Stdout)
	case "version":
		fmt.Println(version)
	default:
		err = fmt.Errorf("unknown command %q", args[0])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dss-standin:", err)
		return 1
	}
	return 0
}
