#!/usr/bin/env bash
# Builds FM for Linux and packages it: for each architecture given, fm,
# fm-agent and nats-server in OUT/linux-ARCH, and OUT/fm_VERSION_ARCH.deb
# and .rpm. make package and make release call it (docs/install.md).
#
#   deploy/packaging/build.sh OUT ARCH...
#
# Reproducible: the same commit and Go toolchain give the same bytes,
# wherever, whenever (-trimpath, no VCS stamp but the commit's, the
# commit's date as every packaged file's time). VERSION, FM_COMMIT and
# SOURCE_DATE_EPOCH override what git says (a build outside a checkout).
set -euo pipefail
cd "$(dirname "$0")/../.."
# A package version starts with a digit and sorts where the release it
# names does (dpkg --compare-versions): v1.2.0 is 1.2.0; a pre-release
# v1.2.0-rc.1 is 1.2.0~rc.1, before 1.2.0; three commits after v1.2.0,
# v1.2.0-3-gabc1234, is 1.2.0+3.gabc1234, after it; uncommitted changes add
# dirty; a commit before any tag is 0.0.0+gabc1234, before every release.
package_version() {
	local v=${1#v} suffix=""
	case "$v" in *-dirty) v=${v%-dirty} suffix=dirty ;; esac
	if [[ $v =~ ^(.*)-([0-9]+)-g([0-9a-f]+)$ ]]; then
		v=${BASH_REMATCH[1]}
		suffix="${BASH_REMATCH[2]}.g${BASH_REMATCH[3]}${suffix:+.$suffix}"
	fi
	if [[ ! $v =~ ^[0-9]+\.[0-9]+ ]]; then
		# No tag: v is the commit's abbreviated hash.
		printf '0.0.0+g%s%s\n' "$(printf '%s' "$v" | sed 's/[^0-9A-Za-z.]/./g')" "${suffix:+.$suffix}"
		return
	fi
	# What follows the tag's first "-" is a pre-release.
	case "$v" in *-*) v="${v%%-*}~$(printf '%s' "${v#*-}" | sed 's/-/./g')" ;; esac
	printf '%s%s\n' "$v" "${suffix:++$suffix}"
}
# build.sh --package-version DESCRIBE: the package version of a git
# describe (the tests check the mapping).
if [ "${1:-}" = "--package-version" ]; then
	package_version "$2"
	exit 0
fi
[ $# -ge 2 ] || { echo "usage: $0 OUT ARCH..." >&2; exit 2; }
out=$1
shift
GO=${GO:-go}
NFPM="github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.48.0"

version=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
commit=${FM_COMMIT-$(git rev-parse --verify -q HEAD 2>/dev/null || true)}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -c log.showSignature=false log -1 --format=%ct HEAD 2>/dev/null || echo 0)}
pkgversion=$(package_version "$version")
ldflags="-X main.version=$version -X main.commit=$commit -X main.commitDate=$SOURCE_DATE_EPOCH"
build=(-trimpath -buildvcs=false)

mkdir -p "$out"
for arch in "$@"; do
	bin="$out/linux-$arch"
	mkdir -p "$bin"
	export CGO_ENABLED=0 GOOS=linux GOARCH="$arch"
	"$GO" build "${build[@]}" -ldflags "$ldflags" -o "$bin/fm-agent" ./cmd/fm-agent
	# fm carries the digest of the slim agent it serves (Makefile, bin/fm).
	agent=$(sha256sum "$bin/fm-agent" | cut -d' ' -f1)
	"$GO" build "${build[@]}" -ldflags "$ldflags -X main.agentSHA256=$agent" -o "$bin/fm" ./cmd/fm
	# The nats-server of go.mod: the version FM's bus is built and tested with.
	"$GO" build "${build[@]}" -o "$bin/nats-server" github.com/nats-io/nats-server/v2
	unset CGO_ENABLED GOOS GOARCH
	for packager in deb rpm; do
		FM_PKG_VERSION=$pkgversion FM_PKG_ARCH=$arch FM_PKG_BIN=$bin \
			"$GO" run "$NFPM" package --config deploy/packaging/nfpm.yaml --packager "$packager" --target "$out/" >/dev/null
	done
done
ls "$out"
