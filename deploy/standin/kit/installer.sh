#!/bin/sh
# DSS STAND-IN kit installer. It has the interface of Dataiku DSS's
# installer.sh, and installs the stand-in, which is not DSS.
#   installer.sh -d DATA_DIR -p PORT -t NODE_TYPE [-l LICENSE_FILE]   install
#   installer.sh -d DATA_DIR -u [-y]                                   upgrade in place
set -eu
here=$(cd "$(dirname "$0")" && pwd)
for arg in "$@"; do
	if [ "$arg" = "-u" ]; then
		exec "$here/bin/dss-standin" upgrade "$@"
	fi
done
exec "$here/bin/dss-standin" install "$@"
