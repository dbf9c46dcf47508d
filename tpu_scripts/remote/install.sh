#!/usr/bin/env bash
# Runs ON each TPU VM host, inside the jaxlm checkout (setup.sh and sky/pretrain.yaml call it):
# creates $JAXLM_VENV (default ~/jaxlm-venv, Python 3.11 through uv, which downloads it when the
# image has an older python3) and installs jaxlm with the given extra (default: tpu).
#   bash tpu_scripts/remote/install.sh [EXTRA]
set -euo pipefail
extra=${1:-tpu}
venv=${JAXLM_VENV:-$HOME/jaxlm-venv}
cd "$(dirname "$0")/../.."
# shellcheck source-path=SCRIPTDIR source=uv.sh
source tpu_scripts/remote/uv.sh
[[ -x $venv/bin/python ]] || uv venv -q --python 3.11 "$venv"
uv pip install -q --python "$venv/bin/python" -e ".[$extra]"
"$venv/bin/python" -c 'import jax, jaxlm; print("jaxlm ready on", __import__("socket").gethostname(), "jax", jax.__version__)'
