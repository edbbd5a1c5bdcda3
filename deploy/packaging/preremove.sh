#!/bin/sh
# Before the fm package is removed (deb: remove; rpm: 0), not before an
# upgrade (deb: upgrade; rpm: 1): the roles stop, gracefully.
set -e
case "$1" in
remove|0) ;;
*) exit 0 ;;
esac
if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
	systemctl disable --now fm-provisioner.service fm-server.service fm-agent.service fm-nats.service || true
fi
exit 0
