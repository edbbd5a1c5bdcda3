#!/bin/sh
# After the fm package is installed or upgraded (deb: configure [old
# version]; rpm: 1 on install, 2 on upgrade). DPKG_ROOT is set when dpkg
# installs into another root (dpkg --root, with chrootless scripts): the
# user is then made there, and systemd is left alone.
set -e
root="${DPKG_ROOT:-}"

# The system user of fm-server, fm-provisioner and fm-nats; the agent runs
# as root. Never removed: files it owns outlive the package.
if ! grep -q '^fm:' "$root/etc/passwd" 2>/dev/null; then
	if [ -n "$root" ]; then prefix="--prefix $root"; else prefix=""; fi
	# shellcheck disable=SC2086
	useradd $prefix --system --user-group --home-dir /var/lib/fm --no-create-home \
		--shell /usr/sbin/nologin --comment "Fleet Manager" fm
fi

upgrade=""
case "$1" in
configure) [ -n "$2" ] && upgrade=1 ;;
2) upgrade=1 ;;
esac

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload
	# An upgrade restarts what was running, on the new binary (each role
	# stops gracefully: docs/install.md); nothing is started on a first
	# install: each role needs its settings first.
	if [ -n "$upgrade" ]; then
		systemctl try-restart fm-nats.service fm-server.service fm-provisioner.service fm-agent.service || true
	fi
fi
exit 0
