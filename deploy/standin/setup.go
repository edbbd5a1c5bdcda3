package main

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
	"strings"
	"unicode"
)

// dssadmin's setup commands, each of which sets up an integration of DSS
// that FM's agent installs. The stand-in installs nothing: it records in
// the data directory what was asked, where its service (and FM's tests)
// look for it. The same command again leaves the files as they are.

func (d dataDir) graphicsExportFile() string {
	return d.path("resources", "graphics-export", "installed.json")
}

func (d dataDir) baseImageFile(imageType string) string {
	return d.path("resources", "container-images", imageType+".json")
}

// sparkEnvFile is bin/env-spark.sh, which bin/dss sources at start.
func (d dataDir) sparkEnvFile() string { return d.path("bin", "env-spark.sh") }

func (d dataDir) impersonationFile() string { return d.path("security", "impersonation.json") }

// installGraphicsExport is dssadmin install-graphics-export, which in DSS
// installs the browser that exports dashboards and flows.
func (d dataDir) installGraphicsExport(installed string, out io.Writer) error {
	if _, err := writeJSONFile(d.graphicsExportFile(), map[string]string{"dssVersion": installed}, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(out, "Graphics export installed for DSS %s (DSS stand-in: no browser was installed)\n", installed)
	return nil
}

// buildBaseImage is dssadmin build-base-image --type container-exec|spark,
// which in DSS builds the Docker image containerized execution (or Spark
// on Kubernetes) runs.
func (d dataDir) buildBaseImage(installed, imageType string, out io.Writer) error {
	switch imageType {
	case "":
		return errors.New("usage: dssadmin build-base-image --type container-exec|spark")
	case "container-exec", "spark":
	default:
		return fmt.Errorf("unknown image type %q (container-exec, spark)", imageType)
	}
	if _, err := writeJSONFile(d.baseImageFile(imageType), map[string]string{"type": imageType, "dssVersion": installed}, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(out, "DSS stand-in: built no image; recorded the %s base image of DSS %s\n", imageType, installed)
	return nil
}

// installSparkIntegration is dssadmin install-spark-integration
// [-sparkHome DIR]: DSS takes the Spark settings at its next start, from
// bin/env-spark.sh. Without -sparkHome, Spark is the data directory's
// spark folder.
func (d dataDir) installSparkIntegration(sparkHome string, out io.Writer) error {
	if sparkHome == "" {
		sparkHome = d.path("spark")
	}
	home, err := filepath.Abs(sparkHome)
	if err != nil {
		return err
	}
	// It goes into a shell script and an environment variable.
	if strings.ContainsFunc(home, unicode.IsControl) {
		return fmt.Errorf("-sparkHome %q is not a folder", sparkHome)
	}
	script := "# Spark integration, written by dssadmin install-spark-integration (DSS stand-in); sourced by bin/dss.\n" +
		"export DKU_SPARK_ENABLED=true\nexport DKU_SPARK_HOME=" + shellQuote(home) + "\n"
	if _, err := writeIfChanged(d.sparkEnvFile(), []byte(script), 0o755); err != nil {
		return err
	}
	fmt.Fprintf(out, "Spark integration installed (DKU_SPARK_HOME=%s); DSS takes it at its next start\n", home)
	return nil
}

var reShellSafe = regexp.MustCompile(`^[A-Za-z0-9_./:@%+,=-]+$`)

// shellQuote quotes s for sh, leaving a plain path as it is.
func shellQuote(s string) string {
	if reShellSafe.MatchString(s) {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// reUnixName is what useradd and groupadd accept by default.
var reUnixName = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

// installImpersonation is dssadmin install-impersonation DSS_USER, which
// in DSS sets up multi-user security (sudoers, the security folder) for
// the unix user DSS runs as.
func (d dataDir) installImpersonation(positional []string, out io.Writer) error {
	if len(positional) != 1 {
		return errors.New("usage: dssadmin install-impersonation DSS_USER")
	}
	dssUser := positional[0]
	if !reUnixName.MatchString(dssUser) {
		return fmt.Errorf("%q is not a unix user name", dssUser)
	}
	// DSS's documentation: stop DSS, then run it as root. The stand-in
	// runs on folders of FM's host as whatever user: root is not checked.
	if _, running := d.runningPID(); running {
		return errors.New("DSS is running: stop it (bin/dss stop) before dssadmin install-impersonation")
	}
	if _, err := writeJSONFile(d.impersonationFile(), map[string]string{"dssUser": dssUser}, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(out, "Multi-user security installed for unix user %s (DSS stand-in: no sudoers rule or unix account was changed)\n", dssUser)
	return nil
}
