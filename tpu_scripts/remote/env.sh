# shellcheck shell=bash
# Sourced ON each TPU VM host before a jaxlm command (run.sh, sky/pretrain.yaml): activates the
# venv that remote/install.sh made and, on a multi-host slice, sets JAX_COORDINATOR_ADDRESS to
# worker 0, read from the TPU metadata exactly as jax.distributed's own Cloud TPU detection does.
# jaxlm's maybe_initialize_distributed() calls jax.distributed.initialize() when that variable is
# set; GCE TPU VMs do not set TPU_WORKER_HOSTNAMES (only GKE does). A single host is left alone.
# shellcheck disable=SC1091
source "${JAXLM_VENV:-$HOME/jaxlm-venv}/bin/activate"
if [[ -z ${JAX_COORDINATOR_ADDRESS:-} ]]; then
    _jaxlm_eps=$(curl -sf --max-time 5 -H 'Metadata-Flavor: Google' \
        "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/worker-network-endpoints" || true)
    if [[ $_jaxlm_eps == *,* ]]; then
        _jaxlm_w0=${_jaxlm_eps%%,*}                              # "name:id:ip" or "hostname"
        export JAX_COORDINATOR_ADDRESS="${_jaxlm_w0##*:}:8482"   # jax's default coordinator port
    fi
    unset _jaxlm_eps _jaxlm_w0
fi
