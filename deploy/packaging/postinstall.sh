#!/bin/sh
# After the fm package is installed or upgraded (deb: configure [old
# version]; rpm: 1 on install, 2 on upgrade). DPKG_ROOT is set when dpkg
# installs into another root (dpkg --root, with chrootless scripts): the
# user is then made there, and systemd is left alone.
set -e
root="${DPKG_ROOT:-}"

# The system user of fm-server, fm-provisioner and fm-nats; the agent runs
# as root. Never removed: files it owns outlive the package.
if [ -n "$root" ]; then
	# Another root: its own files, not this machine's user database.
	grep -q '^fm:' "$root/etc/passwd" 2>/dev/null ||
		useradd --prefix "$root" --system --user-group --home-dir /var/lib/fm --no-create-home \
			--shell /usr/sbin/nologin --comment "Fleet Manager" fm
elif ! getent passwd fm >/dev/null; then
	useradd --system --user-group --home-dir /var/lib/fm --no-create-home \
		--shell /usr/sbin/nologin --comment "Fleet Manager" fm
fi

upgrade=""
case "$1" in
configure) [ -n "${2:-}" ] && upgrade=1 ;;
[0-9]*) [ "$1" -ge 2 ] && upgrade=1 ;;
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
