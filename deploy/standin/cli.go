package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"
)

// cmdCLI is bin/dsscli (and bin/dssadmin): the administration commands of
// DSS that FM's agent uses, with DSS's names.
func cmdCLI(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("dsscli", flag.ContinueOnError)
	dir := fs.String("d", "", "data directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	args = fs.Args()
	if *dir == "" || len(args) == 0 {
		return errors.New("usage: dsscli users-list|user-create|user-edit|api-key-create|api-keys-list|api-key-delete … | " +
			"dssadmin regenerate-config|install-graphics-export|build-base-image --type container-exec|spark|" +
			"install-spark-integration [-sparkHome DIR]|install-impersonation DSS_USER")
	}
	d := dataDir(*dir)
	installed, err := d.installedVersion()
	if err != nil {
		return err
	}
	if installed == "" {
		return errors.New("no DSS installation in " + *dir)
	}
	cmd, rest := args[0], args[1:]
	sub := flag.NewFlagSet(cmd, flag.ContinueOnError)
	password := sub.String("password", "", "password")
	admin := sub.Bool("admin", false, "admin rights")
	label := sub.String("label", "", "key label")
	output := sub.String("output", "text", "text or json")
	imageType := sub.String("type", "", "base image type (build-base-image)")
	sparkHome := sub.String("sparkHome", "", "Spark's folder (install-spark-integration)")
	var positional []string
	for len(rest) > 0 {
		if err := sub.Parse(rest); err != nil {
			return err
		}
		rest = sub.Args()
		if len(rest) > 0 {
			positional, rest = append(positional, rest[0]), rest[1:]
		}
	}
	switch cmd {
	case "users-list":
		users, err := d.loadUsers(installed)
		if err != nil {
			return err
		}
		if *output == "json" {
			list := make([]map[string]any, len(users))
			for i, u := range users {
				list[i] = map[string]any{"login": u.Login, "admin": u.Admin}
			}
			return json.NewEncoder(out).Encode(list)
		}
		for _, u := range users {
			fmt.Fprintf(out, "%s\tadmin=%v\n", u.Login, u.Admin)
		}
		return nil
	case "user-create", "user-edit":
		if len(positional) != 1 || *password == "" {
			return fmt.Errorf("usage: dsscli %s LOGIN --password PASSWORD [--admin]", cmd)
		}
		users, err := d.loadUsers(installed)
		if err != nil {
			return err
		}
		h, err := hashPassword(*password)
		if err != nil {
			return err
		}
		found := -1
		for i, u := range users {
			if u.Login == positional[0] {
				found = i
			}
		}
		switch {
		case cmd == "user-edit" && found < 0:
			return fmt.Errorf("user %q does not exist", positional[0])
		case cmd == "user-create" && found >= 0:
			return fmt.Errorf("user %q already exists", positional[0])
		case found >= 0:
			users[found].Hash = h
		default:
			users = append(users, user{Login: positional[0], Admin: *admin, Hash: h})
		}
		return d.saveUsers(installed, users)
	case "api-key-create":
		secret := randomHex(24)
		h, err := hashPassword(secret)
		if err != nil {
			return err
		}
		keys, err := d.loadKeys()
		if err != nil {
			return err
		}
		k := apiKey{ID: randomHex(6), Label: *label, Admin: *admin, Hash: h, Created: time.Now().UTC()}
		if err := d.saveKeys(append(keys, k)); err != nil {
			return err
		}
		if *output == "json" {
			return json.NewEncoder(out).Encode([]map[string]any{{"id": k.ID, "key": secret, "label": k.Label, "admin": k.Admin}})
		}
		fmt.Fprintln(out, secret)
		return nil
	case "api-keys-list":
		keys, err := d.loadKeys()
		if err != nil {
			return err
		}
		if *output == "json" {
			list := make([]map[string]any, len(keys))
			for i, k := range keys {
				list[i] = map[string]any{"id": k.ID, "label": k.Label, "admin": k.Admin}
			}
			return json.NewEncoder(out).Encode(list)
		}
		for _, k := range keys {
			fmt.Fprintf(out, "%s\t%s\tadmin=%v\n", k.ID, k.Label, k.Admin)
		}
		return nil
	case "api-key-delete":
		if len(positional) != 1 {
			return errors.New("usage: dsscli api-key-delete KEY_ID")
		}
		keys, err := d.loadKeys()
		if err != nil {
			return err
		}
		kept := keys[:0]
		for _, k := range keys {
			if k.ID != positional[0] {
				kept = append(kept, k)
			}
		}
		if len(kept) == len(keys) {
			return fmt.Errorf("no API key %q", positional[0])
		}
		return d.saveKeys(kept)
	case "regenerate-config":
		return d.regenerateConfig()
	case "install-graphics-export", "build-base-image", "install-spark-integration":
		if len(positional) > 0 {
			return fmt.Errorf("dssadmin %s takes no argument, got %q", cmd, positional)
		}
		switch cmd {
		case "install-graphics-export":
			return d.installGraphicsExport(installed, out)
		case "build-base-image":
			return d.buildBaseImage(installed, *imageType, out)
		default:
			return d.installSparkIntegration(*sparkHome, out)
		}
	case "install-impersonation":
		return d.installImpersonation(positional, out)
	}
	return fmt.Errorf("unknown command %q", cmd)
}
