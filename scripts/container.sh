#!/usr/bin/env bash
# `make container`: the CPU service image, built with whichever engine this machine has, from whichever base
# image it can get.
#
#   engine: $BACKEND if set; else Docker when its daemon answers, else Podman.
#   base:   $BASE_IMAGE if set; else python:3.11-slim (BentoML's default) when the engine has it or can pull it;
#           else, with Podman, a Debian base built here from Debian's packages (deploy/local-base.sh: needs root
#           and debootstrap, cached in .cache/container/), for machines that reach no image registry.
#
# usage: scripts/container.sh   env: IMAGE (default mnist-service:latest), BACKEND, BASE_IMAGE, VENV_BIN (.venv/bin)
set -euo pipefail
cd "$(dirname "$0")/.."

image=${IMAGE:-mnist-service:latest}
bin=${VENV_BIN:-.venv/bin}
default_base=python:3.11-slim

engine=${BACKEND:-}
if [[ -z $engine ]]; then
    if command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null 2>&1; then
        engine=podman
    else
        echo "no container engine: no Docker daemon answers and Podman is not installed (make sysdeps installs it)" >&2
        exit 1
    fi
fi
echo "container engine: $engine"

opts=()
if [[ $engine == podman ]]; then
    # Podman copies its own nofile/nproc limits into every container, which fails ("error setting rlimit") where
    # the host's hard limits are lower; deploy/containers.conf only turns that off. A conf of the user's wins.
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/containers.conf}
    opts=(--opt network=host)  # the build's RUN steps reach the package index through the host's network
fi

base=${BASE_IMAGE:-}
if [[ -z $base ]]; then
    if $engine image inspect "$default_base" >/dev/null 2>&1 || $engine pull -q "$default_base" >/dev/null 2>&1; then
        base=$default_base
    elif [[ $engine == podman ]]; then
        echo "no image registry answers for $default_base: building a local Debian base (deploy/local-base.sh)"
        base=$(bash deploy/local-base.sh | tail -1)
    else
        echo "$engine cannot pull $default_base and the local base needs Podman: BACKEND=podman make container," \
            "or BASE_IMAGE=<an image with Python 3.11> make container" >&2
        exit 1
    fi
fi
echo "base image: $base"

# bentofile.yaml with only docker.base_image changed, when the base is not its default.
bentofile=bentofile.yaml
if [[ $base != "$default_base" ]]; then
    bentofile=$(mktemp --suffix=.yaml)
    trap 'rm -f "$bentofile"' EXIT
    "$bin/python" - "$base" "$bentofile" <<'EOF'
import sys

import yaml

config = yaml.safe_load(open("bentofile.yaml"))
config["docker"]["base_image"] = sys.argv[1]
yaml.safe_dump(config, open(sys.argv[2], "w"), sort_keys=False)
EOF
fi

tag=$("$bin/bentoml" build -f "$bentofile" -o tag . | sed -n 's/^__tag__://p')
# BentoML's containerize declares --quiet twice (its own and buildx's); click warns about it at every call.
"$bin/python" -W "ignore:The parameter --quiet is used more than once:UserWarning" -m bentoml \
    containerize "$tag" --backend "$engine" -t "$image" "${opts[@]}"
echo "built $image from $tag on $base; run it with:"
if [[ $engine == podman ]]; then
    echo "  CONTAINERS_CONF=deploy/containers.conf podman run --rm -p 3000:3000 $image"
else
    echo "  docker run --rm -p 3000:3000 $image"
fi
