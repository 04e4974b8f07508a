#!/bin/sh
# Build the HydraFlow packages: the release binary, its manual pages (generated from the clap
# definitions by `hydraflow generate man`, plus the hand-written pages in man/) and shell
# completions into packaging/out/, then the .deb with `cargo deb --no-build` and, with `rpm`
# as an argument, the .rpm with `cargo generate-rpm`.
#
#   packaging/build.sh [deb] [rpm] [--deb-revision N]
#
# The .deb lands in $CARGO_TARGET_DIR/debian/ (default target/debian/), the .rpm in
# $CARGO_TARGET_DIR/generate-rpm/. N overrides the .deb's revision (default 1; the system test
# upgrades to revision 2).
set -eu
cd "$(dirname "$0")/.."

formats=""
deb_revision=""
while [ $# -gt 0 ]; do
    case "$1" in
    deb | rpm) formats="$formats $1" ;;
    --deb-revision) deb_revision="$2"; shift ;;
    *) echo "build.sh: unknown argument $1 (expected deb, rpm or --deb-revision N)" >&2; exit 2 ;;
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
        if [ -n "$deb_revision" ]; then
            cargo deb --no-build --deb-revision "$deb_revision"
        else
            cargo deb --no-build
        fi
        ;;
    rpm)
        cargo generate-rpm
        ;;
    esac
done
