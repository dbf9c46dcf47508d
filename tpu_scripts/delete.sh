#!/usr/bin/env bash
# Delete a TPU VM / pod slice (or its queued resource). Checkpoints in gs:// are not touched.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
    cat <<'USAGE'
Usage: delete.sh --name NAME --zone ZONE [--queued] [--yes] [options]

  --name NAME        TPU name
  --zone ZONE        its zone, e.g. us-central2-b
  --queued           it was created with create.sh --queued: delete the queued resource and,
                     with it (--force), its TPU
  --yes              do not ask for confirmation (gcloud --quiet)
  --project PROJECT  GCP project (default: gcloud's configured project)
  --dry-run          print the gcloud command instead of running it
  -h, --help         show this help
USAGE
}

QUEUED=0 YES=0
split_eq_flags "$@"
set -- "${ARGS[@]}"
while (($#)); do
    case $1 in
        --queued) QUEUED=1; shift ;;
        --yes | -y) YES=1; shift ;;
        *) parse_common "$@"; shift "$SHIFT" ;;
    esac
done

require_name_zone
require_gcloud
location_flags
if ((QUEUED)); then
    cmd=(gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force)
else
    cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}")
fi
((YES)) && cmd+=(--quiet)
run "${cmd[@]}"
