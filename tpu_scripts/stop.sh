#!/usr/bin/env bash
# Stop the job that run.sh --detach started, the way a preemption would: SIGTERM, so jaxlm saves
# a checkpoint and exits (the same run.sh command later resumes from it).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
    cat <<'USAGE'
Usage: stop.sh --name NAME --zone ZONE [--kill] [options]

Send SIGTERM to the detached job on every host (its pid is in ~/jaxlm-logs/job.pid). The
trainer finishes its step, saves a checkpoint and exits; watch it with logs.sh.

  --name NAME        TPU name
  --zone ZONE        its zone, e.g. us-central2-b
  --kill             SIGKILL instead (no checkpoint; for a hung job)
  --worker W         'all' (default) or one worker index
  --project PROJECT  GCP project (default: gcloud's configured project)
  --dry-run          print the gcloud command instead of running it
  -h, --help         show this help
USAGE
}

SIGNAL=TERM WORKER=all
split_eq_flags "$@"
set -- "${ARGS[@]}"
while (($#)); do
    case $1 in
        --kill) SIGNAL=KILL; shift ;;
        --worker) need_value "$@"; WORKER=$2; shift 2 ;;
        *) parse_common "$@"; shift "$SHIFT" ;;
    esac
done

require_name_zone
validate_worker "$WORKER"
require_gcloud
pidfile="$REMOTE_LOGS/job.pid"
tpu_ssh "$WORKER" "if [ -f $pidfile ] && kill -0 \$(cat $pidfile) 2>/dev/null; then kill -$SIGNAL \$(cat $pidfile); echo \"\$(hostname): sent SIG$SIGNAL to pid \$(cat $pidfile)\"; else echo \"\$(hostname): no running job\"; fi"
