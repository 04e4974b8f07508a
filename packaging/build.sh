#!/bin/sh
# Build the HydraFlow packages: the binary, its manual pages (generated from the clap
# definitions by `hydraflow generate man`, which also writes the hand-written pages of man/) and shell
# completions into packaging/out/, then the .deb with `cargo deb --no-build` and, with `rpm`
# as an argument, the .rpm with `cargo generate-rpm`.
#
#   packaging/build.sh [deb] [rpm] [--profile P] [--deb-revision N]...
#
# The binary is compiled once, with the release profile (the packages for users) unless
# --profile names another: CI and the system test use `--profile dev`, the debug build the
# tests compile anyway. A stripped copy goes to packaging/out/hydraflow, which both packages
# install. The .deb lands in $CARGO_TARGET_DIR/debian/
# (default target/debian/), the .rpm in $CARGO_TARGET_DIR/generate-rpm/. Each --deb-revision N
# makes one more .deb of the same binary with revision N (default: one .deb, revision 1; the
# system test upgrades from revision 1 to 2).
set -eu
cd "$(dirname "$0")/.."

formats=""
deb_revisions=""
profile=release
while [ $# -gt 0 ]; do
    case "$1" in
    deb | rpm) formats="$formats $1" ;;
    --deb-revision) deb_revisions="$deb_revisions ${2:?--deb-revision needs a number}"; shift ;;
    --profile) profile="${2:?--profile needs a cargo profile name}"; shift ;;
    *) echo "build.sh: unknown argument $1 (expected deb, rpm, --profile P or --deb-revision N)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$formats" ] || formats=" deb"
[ -n "$deb_revisions" ] || deb_revisions=1

target="${CARGO_TARGET_DIR:-target}"
cargo build --locked --profile "$profile"
# Cargo's output directory of a profile: dev is "debug", the others keep their name.
case "$profile" in
dev) dir=debug ;;
*) dir="$profile" ;;
esac
bin="$target/$dir/hydraflow"

out=packaging/out
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
strip -o "$out/hydraflow" "$bin"
# Every page, the hand-written ones of man/ too, is dated with the release: SOURCE_DATE_EPOCH
# when set, else the newest entry of packaging/debian/changelog.
"$bin" generate man "$out/man" >/dev/null
"$bin" generate completions "$out/completions" >/dev/null
gzip -9n "$out"/man/*

for f in $formats; do
    case "$f" in
    deb)
        # cargo-deb deletes older .debs of the package in target/debian/: build each revision
        # into a directory of its own, then move them all there.
        for revision in $deb_revisions; do
            rm -rf "$target/debian-build/$revision"
            cargo deb --no-build --deb-revision "$revision" --output "$target/debian-build/$revision"
        done
        mkdir -p "$target/debian"
        for revision in $deb_revisions; do
            mv "$target/debian-build/$revision"/*.deb "$target/debian/"
        done
        rm -rf "$target/debian-build"
        ;;
    rpm)
        cargo generate-rpm
        ;;
    esac
done
