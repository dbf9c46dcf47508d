# shellcheck shell=bash disable=SC2034  # (variables here are used by the scripts that source it)
# Shared by the tpu_scripts/*.sh launchers (sourced, never run): argument parsing, validation
# and the run-or-print helper behind --dry-run. Each launcher defines usage() and then:
#
#   source "$(dirname "$0")/common.sh"
#   split_eq_flags "$@"; set -- "${ARGS[@]}"      # --flag=value -> --flag value
#   while (($#)); do case $1 in
#       --spot) SPOT=1; shift ;;                      # script-specific flags first
#       *) parse_common "$@"; shift "$SHIFT" ;;       # --name --zone --project --dry-run --help
#   esac; done
#   require_name_zone
#   run gcloud ...                                   # runs it, or prints "+ gcloud ..." with --dry-run
#
# Errors are one line on stderr, "SCRIPT: error: what is wrong; the fix", and exit status 2.

SCRIPT=$(basename "$0")
TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$TPU_SCRIPTS_DIR")
NAME="" ZONE="" PROJECT="" DRY_RUN=0 SHIFT=1

# Where things live on every TPU VM host (setup.sh creates them; run.sh / logs.sh / stop.sh use
# them). Single-quoted on purpose: $HOME expands there, not here.
# shellcheck disable=SC2016
REMOTE_REPO='$HOME/jaxlm' REMOTE_LOGS='$HOME/jaxlm-logs'

die() {
    echo "$SCRIPT: error: $*" >&2
    exit 2
}

note() { echo "$SCRIPT: $*" >&2; }

# ARGS = "$@" with every --flag=value before a lone -- split into --flag value.
split_eq_flags() {
    ARGS=()
    while (($#)); do
        case $1 in
            --) ARGS+=("$@"); return ;;
            --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
            *) ARGS+=("$1") ;;
        esac
        shift
    done
}

# need_value "$@": the flag in $1 must be followed by a value.
need_value() {
    [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"
}

# The flags every launcher shares. Sets SHIFT to the number of arguments consumed.
parse_common() {
    case $1 in
        --name) need_value "$@"; NAME=$2; SHIFT=2 ;;
        --zone) need_value "$@"; ZONE=$2; SHIFT=2 ;;
        --project) need_value "$@"; PROJECT=$2; SHIFT=2 ;;
        --dry-run) DRY_RUN=1; SHIFT=1 ;;
        -h | --help) usage; exit 0 ;;
        --) die "unexpected '--': this script takes no command (see --help)" ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
}

validate_name() {
    [[ -n $NAME ]] || die "--name is required, e.g. --name my-tpu (see --help)"
    [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
        die "--name '$NAME' is not a valid TPU name; use lowercase letters, digits and '-', starting with a letter (e.g. my-tpu)"
}

validate_zone() {
    [[ -n $ZONE ]] || die "--zone is required, e.g. --zone us-central2-b (see --help)"
    [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
        die "--zone '$ZONE' is not a GCP zone; use one like us-central2-b or europe-west4-a"
}

validate_project() {
    [[ -z $PROJECT || $PROJECT =~ ^[a-z][-a-z0-9:.]{4,61}[a-z0-9]$ ]] ||
        die "--project '$PROJECT' is not a GCP project id; use one like my-project-123"
}

require_name_zone() {
    validate_name
    validate_zone
    validate_project
}

# positive_int FLAG VALUE
positive_int() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 '$2' must be a positive integer"
}

# gcloud flags that locate the TPU: --zone Z [--project P].
location_flags() {
    LOCATION=(--zone "$ZONE")
    [[ -z $PROJECT ]] || LOCATION+=(--project "$PROJECT")
}

# Quote one word for display so that the printed line can be pasted back into bash.
quote() {
    if [[ $1 =~ ^[-A-Za-z0-9_./:=@,+%]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# show_cmd WORD...: "+ word word ..." on one line.
show_cmd() {
    local line="+" w
    for w in "$@"; do line+=" $(quote "$w")"; done
    printf '%s\n' "$line"
}

# run WORD...: with --dry-run print the command on stdout; otherwise echo it on stderr and run it.
run() {
    if ((DRY_RUN)); then
        show_cmd "$@"
    else
        show_cmd "$@" >&2
        "$@"
    fi
}

require_tool() {
    ((DRY_RUN)) || command -v "$1" >/dev/null ||
        die "'$1' is not installed or not on PATH; $2"
}

require_gcloud() {
    require_tool gcloud "install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), or use --dry-run"
}

# tpu_ssh WORKER REMOTE_COMMAND: run a shell command on one worker (0, 1, ...) or on all of them.
tpu_ssh() {
    location_flags
    run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$1" --command "$2"
}

validate_worker() {
    [[ $1 == all || $1 =~ ^(0|[1-9][0-9]*)$ ]] ||
        die "--worker '$1' must be 'all' or a worker index (0, 1, ...)"
}
