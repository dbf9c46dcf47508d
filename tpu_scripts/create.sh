#!/usr/bin/env bash
# Create a Cloud TPU VM (one host) or pod slice (several hosts), directly or as a queued resource.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
    cat <<'EOF'
Usage: create.sh --name NAME --zone ZONE --accelerator TYPE [options] [-- EXTRA_GCLOUD_FLAGS...]

Create a TPU VM or pod slice with `gcloud compute tpus tpu-vm create`, or with --queued
through `gcloud compute tpus queued-resources create` (waits in a queue for capacity; the
usual way to get large or spot slices).

  --name NAME          TPU name (lowercase letters, digits, '-'), e.g. jaxlm-v4-32
  --zone ZONE          zone that has the accelerator, e.g. us-central2-b (v4), us-east5-a (v5p),
                       us-west4-a (v5litepod)
  --accelerator TYPE   TPU type and size: v4-8, v4-32, v5p-128, v5litepod-16, v6e-8, ...
  --version VERSION    TPU software runtime; default by generation: tpu-ubuntu2204-base (v2-v4),
                       v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite (v5litepod), v2-alpha-tpuv6e (v6e)
  --spot               spot capacity: much cheaper, can be preempted at any time
  --queued             create through a queued resource (NAME is both the queued resource and node)
  --project PROJECT    GCP project (default: gcloud's configured project)
  --dry-run            print the gcloud command instead of running it
  -h, --help           show this help
  -- FLAGS...          passed to gcloud unchanged, e.g. -- --network=my-net --reserved

Example:
  tpu_scripts/create.sh --name jaxlm-v4-32 --zone us-central2-b --accelerator v4-32 --spot --queued
EOF
}

ACCELERATOR="" VERSION="" SPOT=0 QUEUED=0 EXTRA=()
split_eq_flags "$@"
set -- "${ARGS[@]}"
while (($#)); do
    case $1 in
        --accelerator) need_value "$@"; ACCELERATOR=$2; shift 2 ;;
        --version) need_value "$@"; VERSION=$2; shift 2 ;;
        --spot) SPOT=1; shift ;;
        --queued) QUEUED=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        *) parse_common "$@"; shift "$SHIFT" ;;
    esac
done

require_name_zone
[[ -n $ACCELERATOR ]] || die "--accelerator is required, e.g. --accelerator v4-32 (see --help)"
[[ $ACCELERATOR =~ ^v[0-9]+[a-z]*(pod)?-[0-9]+$ ]] ||
    die "--accelerator '$ACCELERATOR' is not a TPU type; use one like v4-32, v5p-128 or v5litepod-16"
if [[ -z $VERSION ]]; then
    case $ACCELERATOR in
        v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
        v5p-*) VERSION=v2-alpha-tpuv5 ;;
        v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
        v6e-*) VERSION=v2-alpha-tpuv6e ;;
        *) die "no default runtime for --accelerator '$ACCELERATOR'; pass --version (see https://cloud.google.com/tpu/docs/runtimes)" ;;
    esac
fi
[[ $VERSION =~ ^[a-z0-9][-a-z0-9.]*$ ]] || die "--version '$VERSION' is not a TPU runtime name, e.g. tpu-ubuntu2204-base"
require_gcloud
location_flags

if ((QUEUED)); then
    cmd=(gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" "${LOCATION[@]}"
         --accelerator-type "$ACCELERATOR" --runtime-version "$VERSION")
else
    cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
         --accelerator-type "$ACCELERATOR" --version "$VERSION")
fi
((SPOT)) && cmd+=(--spot)
run "${cmd[@]}" ${EXTRA[@]+"${EXTRA[@]}"}

loc="--zone $ZONE${PROJECT:+ --project $PROJECT}"
if ((QUEUED)); then
    note "queued; it is ready when this says ACTIVE: gcloud compute tpus queued-resources describe $NAME $loc --format='value(state.state)'"
fi
note "next: tpu_scripts/setup.sh --name $NAME $loc --repo URL"
