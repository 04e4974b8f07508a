#!/bin/sh
# Lint the packages built by packaging/build.sh (run by .ci/run after it): mandoc -Tlint on every
# manual page (warnings and worse fail), lintian on the .deb (errors fail), rpmlint on the .rpm
# (errors fail), and the .deb and the .rpm must install the same files.
set -eu
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
status=0

echo "check: mandoc -Tlint -Wwarning"
for page in packaging/out/man/*.gz; do
    gzip -dc "$page" | mandoc -Tlint -Wwarning || { echo "check: $page has lint warnings" >&2; status=1; }
done

deb=$(ls "$target"/debian/hydraflow_*.deb | sort -V | head -n 1)
rpm=$(ls "$target"/generate-rpm/hydraflow-*.rpm | sort -V | tail -n 1)

echo "check: lintian $deb"
lintian --fail-on error "$deb" || status=1

echo "check: rpmlint $rpm"
rpmlint -r packaging/rpm/rpmlintrc "$rpm" || status=1

echo "check: the .deb and the .rpm list the same files"
dpkg-deb --fsys-tarfile "$deb" | tar -t | sed 's|^\./|/|' | grep -v '/$' \
    | grep -v '^/usr/share/doc/hydraflow/\(copyright\|changelog.Debian.gz\)$' | sort >"$target/deb-files.txt"
rpm -qpl "$rpm" | sort >"$target/rpm-files.txt"
if ! diff -u "$target/deb-files.txt" "$target/rpm-files.txt"; then
    echo "check: the .deb and the .rpm differ (files above)" >&2
    status=1
fi
exit "$status"
