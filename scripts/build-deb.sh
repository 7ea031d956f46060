#!/usr/bin/env bash
# Builds Hatchery's Debian packages from packaging/:
#   hatchery          the provisioning service and hub (hatchery serve, as a
#                     systemd service of user hatchery) and the operator's CLI;
#   hatchery-iotedge  the device runtime: iotedge, iotedged and aziot-tpmd,
#                     their systemd units, the udev rule for the TPM and the
#                     config template.
#
#   scripts/build-deb.sh [OUTDIR [PACKAGE...]]   (default dist and both;
#                                                `make deb` runs it)
#
# Environment: VERSION (default from `git describe --tags`, else
# 1.5.0~git<commit time>.<commit>), GOARCH (default go env GOARCH; GOARM
# for arm), MAINTAINER, GO, SOURCE_DATE_EPOCH (default the commit's time).
# Needs only go and dpkg-deb; downloads nothing but Go modules the build
# would download anyway. Prints the path of each .deb, one per line, last.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
outdir=${1:-dist}
shift || true
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=(hatchery hatchery-iotedge)
GO=${GO:-go}

die() { echo "build-deb: $*" >&2; exit 1; }
for pkg in "${packages[@]}"; do
	case "$pkg" in
	hatchery | hatchery-iotedge) ;;
	*) die "no package $pkg: hatchery or hatchery-iotedge" ;;
	esac
done
command -v "$GO" >/dev/null 2>&1 || die "$GO is not on PATH"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb is not on PATH (Debian package dpkg)"

# The version, for the package and for -X main.Version.
if [ -z "${VERSION:-}" ]; then
	if d=$(git describe --tags --match 'v[0-9]*' 2>/dev/null); then
		# v1.5.1 -> 1.5.1; v1.5.1-3-gabc1234 -> 1.5.1+3.gabc1234
		VERSION=$(printf '%s' "${d#v}" | sed -E 's/-([0-9]+)-g([0-9a-f]+)$/+\1.g\2/')
	elif h=$(git rev-parse --short=12 HEAD 2>/dev/null); then
		VERSION="1.5.0~git$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y%m%d%H%M%S).$h"
	else
		VERSION=1.5.0
	fi
fi
printf '%s' "$VERSION" | grep -Eq '^([0-9]+:)?[0-9][A-Za-z0-9.+~-]*$' ||
	die "VERSION $VERSION is not a Debian version (digits first, then letters, digits and . + ~ -)"

# Debian's name for the Go architecture.
goarch=${GOARCH:-$("$GO" env GOARCH)}
case "$goarch" in
amd64 | arm64 | riscv64 | s390x | loong64) arch=$goarch ;;
386) arch=i386 ;;
ppc64le) arch=ppc64el ;;
mips64le) arch=mips64el ;;
arm) case "${GOARM:-7}" in 7*) arch=armhf ;; *) arch=armel ;; esac ;;
*) die "no Debian architecture for GOARCH=$goarch" ;;
esac

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
MAINTAINER=${MAINTAINER:-Hatchery maintainers <maintainers@hatchery.invalid>}

umask 022
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
stage=$(mktemp -d "${TMPDIR:-/tmp}/build-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# license_of prints the license(s) of the Go module whose source is in $1.
license_of() {
	local f l=
	if [ -z "$1" ] || [ ! -d "$1" ]; then echo "unknown (module source not found)"; return; fi
	f=$(find "$1" -maxdepth 1 \( -name 'LICENSE*' -o -name 'COPYING*' \) | sort | head -n 1)
	[ -n "$f" ] || { echo "unknown (no LICENSE file)"; return; }
	grep -q 'Apache License' "$f" && l="$l${l:+ and }Apache-2.0"
	grep -q 'Mozilla Public License' "$f" && l="$l${l:+ and }MPL-2.0"
	grep -q 'Permission is hereby granted, free of charge' "$f" && l="$l${l:+ and }MIT"
	grep -Eq 'Permission to use, copy, modify, and(/or)? distribute' "$f" && l="$l${l:+ and }ISC"
	if grep -q 'Neither the name' "$f"; then l="$l${l:+ and }BSD-3-Clause"
	elif grep -q 'Redistribution and use in source and binary forms' "$f"; then l="$l${l:+ and }BSD-2-Clause"
	fi
	echo "${l:-see $(basename "$f") of the module}"
}

# build_package PACKAGE: the commands it holds and the files beside them,
# then its control area; prints the .deb's path.
build_package() {
	local pkg=$1 root=$stage/$1 cmds cmd s
	case "$pkg" in
	hatchery) cmds=(hatchery) ;;
	hatchery-iotedge) cmds=(iotedge iotedged aziot-tpmd) ;;
	esac
	mkdir -p "$root/DEBIAN"
	for cmd in "${cmds[@]}"; do
		CGO_ENABLED=0 GOOS=linux GOARCH=$goarch "$GO" build -trimpath \
			-ldflags "-s -w -X main.Version=$VERSION" -o "$root/usr/bin/$cmd" "./cmd/$cmd"
	done
	case "$pkg" in
	hatchery)
		install -D -m 0644 packaging/systemd/hatchery.service "$root/lib/systemd/system/hatchery.service"
		install -D -m 0644 packaging/default/hatchery "$root/etc/default/hatchery"
		;;
	hatchery-iotedge)
		install -D -m 0644 packaging/systemd/aziot-tpmd.service "$root/lib/systemd/system/aziot-tpmd.service"
		install -D -m 0644 packaging/systemd/iotedged.service "$root/lib/systemd/system/iotedged.service"
		install -D -m 0644 packaging/udev/70-hatchery-aziottpm.rules "$root/lib/udev/rules.d/70-hatchery-aziottpm.rules"
		install -D -m 0644 packaging/config.toml.edge.template "$root/etc/aziot/config.toml.edge.template"
		;;
	esac
	local doc=$root/usr/share/doc/$pkg
	install -D -m 0644 "packaging/debian/$pkg/README.Debian" "$doc/README.Debian"

	# copyright: the project's stanza, then the Go modules linked into the
	# binaries, with the license their LICENSE file names.
	{
		cat packaging/debian/copyright
		echo
		echo "Files: usr/bin/*"
		echo "Copyright: the Go Authors"
		echo "License: BSD-3-Clause"
		echo "Comment: the binaries are statically linked with the Go $("$GO" env GOVERSION | sed 's/^go//') standard library"
		echo "  and these Go modules (module version: license):"
		CGO_ENABLED=0 GOOS=linux GOARCH=$goarch "$GO" list -deps \
			-f '{{with .Module}}{{if not .Main}}{{.Path}} {{.Version}} {{.Dir}}{{end}}{{end}}' \
			"${cmds[@]/#/./cmd/}" | sort -u |
			while read -r path version dir; do
				echo "  $path $version: $(license_of "$dir")"
			done
	} >"$doc/copyright"
	chmod 0644 "$doc/copyright"

	# Control area.
	sed -e "s|@VERSION@|$VERSION|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$MAINTAINER|" \
		-e "s|@INSTALLED_SIZE@|$(du -sk --exclude=DEBIAN "$root" | cut -f1)|" \
		"packaging/debian/$pkg/control.in" >"$root/DEBIAN/control"
	install -m 0644 "packaging/debian/$pkg/conffiles" "$root/DEBIAN/conffiles"
	for s in postinst prerm postrm; do
		install -m 0755 "packaging/debian/$pkg/$s" "$root/DEBIAN/$s"
	done
	(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
		xargs -0 md5sum) >"$root/DEBIAN/md5sums"
	chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"

	find "$root" -type d -exec chmod 0755 {} +
	find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

	local deb=$outdir/${pkg}_${VERSION#*:}_$arch.deb
	dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
	echo "$deb"
}

for pkg in "${packages[@]}"; do
	build_package "$pkg"
done
