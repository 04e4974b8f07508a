#!/bin/sh
# Prepare this host for the booted-container system tests (`cargo test -- --include-ignored`,
# as root): install debootstrap, systemd-container (systemd-nspawn) and dbus when missing, and
# nothing else (no upgrade of what is installed), and build the
# cached minimal Debian 12 rootfs once under $HYDRAFLOW_TEST_CACHE (default
# /var/cache/hydraflow-test). polkitd needs libpam-systemd (it provides default-logind, which
# debootstrap does not resolve by itself). The mirror is read from this machine's apt sources. Run as root.
set -eu

cache="${HYDRAFLOW_TEST_CACHE:-/var/cache/hydraflow-test}"
rootfs="$cache/rootfs"
suite=bookworm
# man-db: the package test checks `man hydraflow` and lets `systemd-analyze verify` check the
# units' Documentation= pages. The marker file holds this list: a cache built with another list
# is rebuilt.
include=systemd,systemd-sysv,dbus,polkitd,libpam-systemd,git,ca-certificates,man-db

missing=""
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
command -v systemd-nspawn >/dev/null 2>&1 || missing="$missing systemd-container"
command -v dbus-daemon >/dev/null 2>&1 || missing="$missing dbus"
command -v nsenter >/dev/null 2>&1 || missing="$missing util-linux"
if [ -n "$missing" ]; then
    echo "prepare-host: installing$missing"
    apt-get update -q
    # Install what is missing and upgrade nothing: systemd-container must be the installed
    # systemd's version (asked for by version, apt would otherwise upgrade systemd to the
    # newest to match), and a simulated install that would still upgrade a package stops here.
    pkgs=""
    for pkg in $missing; do
        if [ "$pkg" = systemd-container ] && version=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null) && [ -n "$version" ]; then
            pkg="systemd-container=$version"
        fi
        pkgs="$pkgs $pkg"
    done
    # shellcheck disable=SC2086
    upgrades=$(apt-get install -s -q --no-install-recommends --no-upgrade $pkgs | sed -n 's/^Inst \([^ ]*\) \[.*/\1/p' | tr '\n' ' ')
    if [ -n "$upgrades" ]; then
        echo "prepare-host: installing$pkgs would upgrade $upgrades; install them yourself, then run this again" >&2
        exit 1
    fi
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --no-upgrade $pkgs
fi

if [ "$(cat "$rootfs/.hydraflow-rootfs-complete" 2>/dev/null)" = "$include" ]; then
    echo "prepare-host: rootfs cached at $rootfs"
    exit 0
fi

# The first Debian mirror of the machine's apt sources serving $suite (deb822 or one-line).
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    mirror=$(awk -v suite="$suite" '
        /^$/ { if (uris != "" && suites ~ ("(^| )" suite "( |$)")) { print uris; exit } uris=""; suites="" }
        /^URIs:/ { uris=$2 }
        /^Suites:/ { $1=""; suites=$0 " " }
        END { if (uris != "" && suites ~ ("(^| )" suite "( |$)")) print uris }
    ' "$f" | head -n 1)
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ]; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] || continue
        mirror=$(awk -v suite="$suite" '$1 == "deb" && $0 ~ (" " suite " ") { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f" | head -n 1)
        [ -n "$mirror" ] && break
    done
fi
if [ -z "$mirror" ]; then
    echo "prepare-host: no apt source for $suite found in /etc/apt: add one or set up a mirror" >&2
    exit 1
fi

mkdir -p "$cache"
tmp="$cache/rootfs.tmp.$$"
rm -rf "$tmp"
trap 'cp "$tmp/debootstrap/debootstrap.log" "$cache/debootstrap-failed.log" 2>/dev/null; rm -rf "$tmp"' EXIT
echo "prepare-host: debootstrap $suite from $mirror into $rootfs"
debootstrap --variant=minbase \
    --include="$include" \
    "$suite" "$tmp" "$mirror"
# A machine id is made at first boot of each copy.
: >"$tmp/etc/machine-id"
echo "$include" >"$tmp/.hydraflow-rootfs-complete"
rm -rf "$rootfs"
mv "$tmp" "$rootfs"
trap - EXIT
echo "prepare-host: rootfs ready at $rootfs"
