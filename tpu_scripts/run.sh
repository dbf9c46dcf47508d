#!/usr/bin/env bash
# Run one command on every host of a TPU slice at once, logging each host to ~/jaxlm-logs/HOST.log.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
    cat <<'EOF'
Usage: run.sh --name NAME --zone ZONE [--detach] [--env KEY=VALUE]... [options] -- COMMAND...

Run COMMAND in ~/jaxlm on every host at the same time (a multi-host JAX program needs all of
them), inside ~/jaxlm-venv, with jax.distributed pointed at worker 0 on a pod slice
(tpu_scripts/remote/env.sh). Each host appends its output to ~/jaxlm-logs/$(hostname).log.

  --name NAME        TPU name
  --zone ZONE        its zone, e.g. us-central2-b
  --detach           start COMMAND in the background (nohup, own session) and return at once;
                     follow it with logs.sh, stop it with stop.sh (SIGTERM: jaxlm checkpoints and exits)
  --env KEY=VALUE    export a variable for COMMAND (repeatable), e.g. --env XLA_FLAGS=...
  --worker W         'all' (default) or one worker index, for debugging
  --project PROJECT  GCP project (default: gcloud's configured project)
  --dry-run          print the gcloud command instead of running it
  -h, --help         show this help

Without --detach the output of all hosts streams to this terminal; a long run should use
--detach, since closing the terminal may end it. Running the same pretraining command again
resumes from the latest checkpoint in its --workdir.

Example:
  tpu_scripts/run.sh --name jaxlm-v4-32 --zone us-central2-b --detach -- \
    python experiments/pretrain.py --workdir gs://BUCKET/llama2_7b \
      --config=experiments/configs/pretrain.py:llama2_7b
EOF
}

DETACH=0 WORKER=all ENVS=() CMD=()
split_eq_flags "$@"
set -- "${ARGS[@]}"
while (($#)); do
    case $1 in
        --detach) DETACH=1; shift ;;
        --worker) need_value "$@"; WORKER=$2; shift 2 ;;
        --env)
            need_value "$@"
            [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$2' must be KEY=VALUE, e.g. --env XLA_FLAGS=--xla_dump_to=/tmp/dump"
            ENVS+=("$2"); shift 2 ;;
        --) shift; CMD=("$@"); break ;;
        -*) parse_common "$@"; shift "$SHIFT" ;;
        *) die "the command must follow '--', e.g. run.sh --name N --zone Z -- python experiments/pretrain.py ..." ;;
    esac
done

require_name_zone
validate_worker "$WORKER"
((${#CMD[@]})) || die "no command to run; put it after '--', e.g. -- python experiments/pretrain.py --workdir ... --config=..."
require_gcloud

command=""
for w in "${CMD[@]}"; do command+="${command:+ }$(quote "$w")"; done
exports=""
for kv in ${ENVS[@]+"${ENVS[@]}"}; do exports+="export ${kv%%=*}=$(quote "${kv#*=}"); "; done

log="$REMOTE_LOGS/\$(hostname).log"
pidfile="$REMOTE_LOGS/job.pid"
prologue="set -eo pipefail; mkdir -p $REMOTE_LOGS; cd $REMOTE_REPO; source tpu_scripts/remote/env.sh; ${exports}echo \"=== \$(date -u +%FT%TZ) \$(hostname): \"$(quote "${CMD[*]}") >> $log"
if ((DETACH)); then
    running="if [ -f $pidfile ] && kill -0 \$(cat $pidfile) 2>/dev/null; then echo \"\$(hostname): a job is already running (pid \$(cat $pidfile)); stop it with stop.sh\" >&2; exit 1; fi"
    job="echo \$\$ > $pidfile; exec $command >> $log 2>&1 < /dev/null"
    remote="$running; $prologue; setsid nohup bash -c $(quote "$job") > /dev/null 2>&1 < /dev/null & echo \"\$(hostname): started; log: $log\""
else
    remote="$prologue; $command 2>&1 | tee -a $log"
fi
tpu_ssh "$WORKER" "$remote"
if ((DETACH)); then
    note "follow it: tpu_scripts/logs.sh --name $NAME --zone $ZONE${PROJECT:+ --project $PROJECT}"
fi
