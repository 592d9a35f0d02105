#!/usr/bin/env bash
# Build a Debian bookworm + Python 3.11 base image without any container registry and load it into
# Podman. Used by tests/test_container.py (CI machines reach package registries, not image registries);
# users with a registry don't need it: the default build starts from python:3.11-slim.
#
# The image already holds what BentoML's generated Dockerfile installs with apt (ca-certificates gnupg2
# bash build-essential git), so that step is a no-op and the image build stays quick. The root
# filesystem is cached as a tarball, so only the first run pays for debootstrap.
#
# usage: deploy/local-base.sh    (needs root, debootstrap and podman; prints the image name last)
# env:   MNIST_CACHE_DIR (default .cache/container), DEBIAN_MIRROR (default http://deb.debian.org/debian)
set -euo pipefail

# Bump when the package list or the steps below change: it names both the cached tarball and the image.
version=v1
image=localhost/mnist-base:bookworm-py311-$version
cache_dir=${MNIST_CACHE_DIR:-.cache/container}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tarball=$cache_dir/bookworm-py311-$version.tar
packages=python3,python3-pip,python3-venv,ca-certificates,gnupg2,bash,build-essential,git

if podman image exists "$image"; then
    echo "$image"
    exit 0
fi

if [[ ! -f $tarball ]]; then
    mkdir -p "$cache_dir"
    rootfs=$(mktemp -d /var/tmp/mnist-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >&2
    # The host's bundle, not Debian's stock one: it carries whatever CA this network's TLS proxy uses,
    # and pip/uv inside the image build must trust it to reach the package index.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    # BentoML's Dockerfile runs `pip install uv` with the system pip; PEP 668 would refuse it.
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar --numeric-owner -C "$rootfs" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
fi

# uv ships its own CA roots; SSL_CERT_FILE makes it (and Python's ssl) use the bundle above.
podman import \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    "$tarball" "$image" >&2
echo "$image"
