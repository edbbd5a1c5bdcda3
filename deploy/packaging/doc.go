// Package packaging holds FM's Linux packages: nfpm's configuration
// (nfpm.yaml), the systemd units of each role with their shared sandbox,
// the default settings installed in /etc/fm, the maintainer scripts, and
// build.sh, which make package and make release run. It has no code; its
// tests build a package, install it into a throwaway root with dpkg,
// verify its units with systemd-analyze and upgrade it. Nothing imports it.
package packaging
