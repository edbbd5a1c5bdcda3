#!/bin/sh
# After the fm package is removed or purged. FM's data (/var/lib/fm: the
# bus, FM's keys) and the fm user are kept even on purge: deleting a fleet's
# records is not a package manager's call (docs/install.md).
set -e
if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
fi
exit 0
