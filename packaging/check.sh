#!/bin/sh
# Lint the packages built by packaging/build.sh (run by .ci/run after it): mandoc -Tlint on every
# manual page (warnings and worse fail), lintian on the .deb and rpmlint on the .rpm (warnings
# and worse fail: a tag that cannot be fixed is overridden with its reason, in
# packaging/debian/hydraflow.lintian-overrides and packaging/rpm/rpmlintrc), every manual page
# dated with the release, and the .deb and the .rpm must install the same files.
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
lintian --fail-on warning "$deb" || status=1

echo "check: rpmlint $rpm"
rpmlint --strict -c packaging/rpm/rpmlint.toml -r packaging/rpm/rpmlintrc "$rpm" || status=1

# The release date: SOURCE_DATE_EPOCH when set, else the newest changelog entry (as build.sh).
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
    released=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)
else
    released=$(date -u -d "$(sed -n 's/^ -- .*>  //p' packaging/debian/changelog | head -n 1)" +%Y-%m-%d)
fi
echo "check: every manual page is dated $released"
for page in packaging/out/man/*.gz; do
    gzip -dc "$page" | grep -q "^\.TH [^ ]* [0-9] $released " || { echo "check: $page is not dated $released" >&2; status=1; }
done

echo "check: the .deb and the .rpm list the same files"
dpkg-deb --fsys-tarfile "$deb" | tar -t | sed 's|^\./|/|' | grep -v '/$' \
    | grep -v '^/usr/share/doc/hydraflow/\(copyright\|changelog.Debian.gz\)$' \
    | grep -v '^/usr/share/lintian/overrides/hydraflow$' | sort >"$target/deb-files.txt"
rpm -qpl "$rpm" | sort >"$target/rpm-files.txt"
if ! diff -u "$target/deb-files.txt" "$target/rpm-files.txt"; then
    echo "check: the .deb and the .rpm differ (files above)" >&2
    status=1
fi
exit "$status"
