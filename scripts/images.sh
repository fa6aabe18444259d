#!/usr/bin/env bash
# Builds Keel's container images from what is on this machine (no registry is needed):
#   keel/base:dev  a minimal runtime: busybox (static) + the host's glibc
#   keel/nats:dev  Debian's nats-server on keel/base
# Docker's layer cache makes a re-run cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/prereqs.sh
source scripts/prereqs.sh
keel_install_prereqs

if ! docker info >/dev/null 2>&1; then
    echo "images.sh: no Docker engine reachable; skipping image builds" >&2
    [ "${CI:-}" = "true" ] && exit 1
    exit 0
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

# build TAG DIR: the classic builder needs no frontend image; its chatter goes to a log
# that is shown only when the build fails.
build() {
    if ! DOCKER_BUILDKIT=0 docker build -t "$1" "$2" >"$ctx/build.log" 2>&1; then
        cat "$ctx/build.log" >&2
        exit 1
    fi
    echo "built $1"
}

# The base rootfs: busybox for a shell and wget (healthchecks), glibc for our binaries.
root="$ctx/base/rootfs"
mkdir -p "$root"/{bin,lib64,lib/x86_64-linux-gnu,etc,tmp,data,usr/local/bin}
cp /bin/busybox "$root/bin/busybox"
for applet in sh wget cat ls ps kill sleep; do ln -sf busybox "$root/bin/$applet"; done
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
for lib in libc.so.6 libm.so.6 libgcc_s.so.1; do
    cp -L "/lib/x86_64-linux-gnu/$lib" "$root/lib/x86_64-linux-gnu/"
done
printf 'root:x:0:0:root:/:/bin/sh\nkeel:x:1000:1000:keel:/data:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nkeel:x:1000:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
cp docker/base.Dockerfile "$ctx/base/Dockerfile"
build keel/base:dev "$ctx/base"

mkdir -p "$ctx/nats"
cp "$(command -v nats-server)" "$ctx/nats/nats-server"
cp docker/nats.Dockerfile "$ctx/nats/Dockerfile"
build keel/nats:dev "$ctx/nats"
