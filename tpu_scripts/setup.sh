#!/usr/bin/env bash
# Put jaxlm on every host of a TPU VM / pod slice and install it with the tpu extra.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
    cat <<'EOF'
Usage: setup.sh --name NAME --zone ZONE [--repo URL [--ref REF] | --local] [options]

On every host (--worker=all): fetch jaxlm into ~/jaxlm, then create ~/jaxlm-venv (Python 3.11,
through uv) and `pip install -e '.[tpu]'` (jax[tpu] + libtpu). Safe to run again: it updates
the checkout and the install.

  --name NAME        TPU name given to create.sh
  --zone ZONE        its zone, e.g. us-central2-b
  --repo URL         git URL to clone (default: this checkout's 'origin' remote); a private
                     repository needs credentials on the TPU VMs, or use --local
  --ref REF          branch, tag or commit to check out (default: main)
  --local            ship this checkout's committed HEAD (git archive + scp) instead of cloning
  --extra EXTRA      setup.py extra to install (default: tpu)
  --project PROJECT  GCP project (default: gcloud's configured project)
  --dry-run          print the commands instead of running them
  -h, --help         show this help

Example:
  tpu_scripts/setup.sh --name jaxlm-v4-32 --zone us-central2-b --repo https://github.com/you/jaxlm
EOF
}

REPO="" REF=main LOCAL=0 EXTRA_NAME=tpu
split_eq_flags "$@"
set -- "${ARGS[@]}"
while (($#)); do
    case $1 in
        --repo) need_value "$@"; REPO=$2; shift 2 ;;
        --ref) need_value "$@"; REF=$2; shift 2 ;;
        --local) LOCAL=1; shift ;;
        --extra) need_value "$@"; EXTRA_NAME=$2; shift 2 ;;
        *) parse_common "$@"; shift "$SHIFT" ;;
    esac
done

require_name_zone
[[ $EXTRA_NAME =~ ^[a-z][a-z0-9_,-]*$ ]] || die "--extra '$EXTRA_NAME' is not a setup.py extra name, e.g. --extra tpu"
install="bash tpu_scripts/remote/install.sh $EXTRA_NAME"

if ((LOCAL)); then
    [[ -z $REPO ]] || die "--local and --repo exclude each other; pass one"
    git -C "$REPO_ROOT" rev-parse -q --verify HEAD >/dev/null 2>&1 ||
        die "--local needs a git checkout with a commit at $REPO_ROOT; commit, or use --repo URL"
    require_gcloud
    location_flags
    tarball="${TMPDIR:-/tmp}/jaxlm-src-$NAME.tar.gz"
    run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:jaxlm-src.tar.gz" "${LOCATION[@]}" --worker=all
    tpu_ssh all "set -euo pipefail; rm -rf $REMOTE_REPO.old; if [ -e $REMOTE_REPO ]; then mv $REMOTE_REPO $REMOTE_REPO.old; fi; mkdir $REMOTE_REPO; tar xzf \$HOME/jaxlm-src.tar.gz -C $REMOTE_REPO; cd $REMOTE_REPO; $install"
    exit 0
fi

if [[ -z $REPO ]]; then
    REPO=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null) ||
        die "--repo is required (this checkout has no 'origin' remote), e.g. --repo https://github.com/you/jaxlm; or use --local"
fi
[[ $REPO =~ ^[^[:space:]\'\"\;\&\|\$\`]+$ ]] || die "--repo '$REPO' is not a git URL, e.g. https://github.com/you/jaxlm"
[[ $REF =~ ^[A-Za-z0-9][-A-Za-z0-9._/]*$ ]] || die "--ref '$REF' is not a branch, tag or commit name, e.g. --ref main"
require_gcloud
r=$(quote "$REPO")
tpu_ssh all "set -euo pipefail; if [ ! -d $REMOTE_REPO/.git ]; then git clone -q $r $REMOTE_REPO; fi; cd $REMOTE_REPO; git remote set-url origin $r; git fetch -q origin $REF; git checkout -q --detach FETCH_HEAD; $install"
