#!/usr/bin/env bash
# Stream the per-host logs that run.sh writes (~/jaxlm-logs/HOST.log) back to this terminal.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
    cat <<'USAGE'
Usage: logs.sh --name NAME --zone ZONE [--worker 0|all|N] [--lines N] [--no-follow] [options]

Print the last lines of ~/jaxlm-logs/$(hostname).log and keep following it (tail -F), each
line prefixed with [hostname]. Worker 0 is process 0, the one that logs metrics; use
--worker all to see every host (e.g. to find the one that crashed). Ctrl-C stops following;
the job keeps running.

  --name NAME        TPU name
  --zone ZONE        its zone, e.g. us-central2-b
  --worker W         0 (default), 'all', or another worker index
  --lines N          how many past lines to show first (default: 100)
  --no-follow        print and exit instead of following
  --project PROJECT  GCP project (default: gcloud's configured project)
  --dry-run          print the gcloud command instead of running it
  -h, --help         show this help
USAGE
}

WORKER=0 LINES=100 FOLLOW=1
split_eq_flags "$@"
set -- "${ARGS[@]}"
while (($#)); do
    case $1 in
        --worker) need_value "$@"; WORKER=$2; shift 2 ;;
        --lines) need_value "$@"; LINES=$2; shift 2 ;;
        --no-follow) FOLLOW=0; shift ;;
        *) parse_common "$@"; shift "$SHIFT" ;;
    esac
done

require_name_zone
validate_worker "$WORKER"
positive_int --lines "$LINES"
require_gcloud
tail="tail -n $LINES"
((FOLLOW)) && tail+=" -F"
tpu_ssh "$WORKER" "$tail $REMOTE_LOGS/\$(hostname).log | sed -u \"s/^/[\$(hostname)] /\""
