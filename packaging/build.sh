#!/bin/sh
# Build the HydraFlow packages: the release binary, its manual pages (generated from the clap
# definitions by `hydraflow generate man`, plus the hand-written pages in man/) and shell
# completions into packaging/out/, then the .deb with `cargo deb --no-build` and, with `rpm`
# as an argument, the .rpm with `cargo generate-rpm`.
#
#   packaging/build.sh [deb] [rpm] [--deb-version VERSION]
#
# The .deb lands in $CARGO_TARGET_DIR/debian/ (default target/debian/), the .rpm in
# $CARGO_TARGET_DIR/generate-rpm/. VERSION overrides the .deb's version (used by the system test
# to build an upgrade).
set -eu
cd "$(dirname "$0")/.."

formats=""
deb_version=""
while [ $# -gt 0 ]; do
    case "$1" in
    deb | rpm) formats="$formats $1" ;;
    --deb-version) deb_version="$2"; shift ;;
    *) echo "build.sh: unknown argument $1 (expected deb, rpm or --deb-version VERSION)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$formats" ] || formats=" deb"

target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked
bin="$target/release/hydraflow"

out=packaging/out
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$bin" generate man "$out/man" >/dev/null
"$bin" generate completions "$out/completions" >/dev/null
cp man/*.5 man/*.8 "$out/man/"
gzip -9n "$out"/man/*

for f in $formats; do
    case "$f" in
    deb)
        if [ -n "$deb_version" ]; then
            cargo deb --no-build --deb-version "$deb_version"
        else
            cargo deb --no-build
        fi
        ;;
    rpm)
        cargo generate-rpm
        ;;
    esac
done
