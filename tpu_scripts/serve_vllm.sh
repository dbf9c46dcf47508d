#!/usr/bin/env bash
# Serve an exported jaxlm checkpoint (Hugging Face layout) with vLLM's OpenAI-compatible server.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
    cat <<'EOF'
Usage: serve_vllm.sh --model HF_DIR [--port 8000] [--tp N] [--max-model-len L] [options] [-- VLLM_FLAGS...]

Run `vllm serve HF_DIR` (OpenAI-compatible API on http://HOST:PORT/v1) and print a curl
example. HF_DIR is what jaxlm exports:

  python -m jaxlm.convert export-hf --src WORKDIR/model --dst HF_DIR

vLLM is not a jaxlm dependency; install it where you serve: `pip install vllm` on a GPU
machine, `pip install vllm-tpu` on a TPU VM (same `vllm serve` command).

  --model HF_DIR         exported checkpoint folder (config.json, *.safetensors, tokenizer)
  --port PORT            port to listen on (default: 8000)
  --host HOST            address to bind (default: 0.0.0.0)
  --tp N                 tensor-parallel size: GPUs / TPU chips to shard over (default: 1)
  --max-model-len L      longest prompt + completion in tokens (default: the model's)
  --served-model-name S  the "model" name clients send (default: HF_DIR's folder name)
  --dry-run              print the command (and the curl example) instead of running it
  -h, --help             show this help
  -- FLAGS...            passed to vllm serve unchanged, e.g. -- --gpu-memory-utilization 0.85

Example:
  tpu_scripts/serve_vllm.sh --model runs/llama2_7b/hf --tp 4 --max-model-len 4096
EOF
}

MODEL="" PORT=8000 HOST=0.0.0.0 TP=1 MAX_LEN="" SERVED="" EXTRA=()
split_eq_flags "$@"
set -- "${ARGS[@]}"
while (($#)); do
    case $1 in
        --model) need_value "$@"; MODEL=$2; shift 2 ;;
        --port) need_value "$@"; PORT=$2; shift 2 ;;
        --host) need_value "$@"; HOST=$2; shift 2 ;;
        --tp | --tensor-parallel-size) need_value "$@"; TP=$2; shift 2 ;;
        --max-model-len) need_value "$@"; MAX_LEN=$2; shift 2 ;;
        --served-model-name) need_value "$@"; SERVED=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

export_hint="export one with: python -m jaxlm.convert export-hf --src WORKDIR/model --dst HF_DIR"
[[ -n $MODEL ]] || die "--model is required, e.g. --model runs/llama2_7b/hf; $export_hint"
[[ -d $MODEL ]] || die "--model '$MODEL' is not a folder; $export_hint"
[[ -f $MODEL/config.json ]] || die "--model '$MODEL' has no config.json, so it is not a Hugging Face checkpoint; $export_hint"
positive_int --port "$PORT"
((PORT <= 65535)) || die "--port '$PORT' must be at most 65535"
positive_int --tp "$TP"
[[ -z $MAX_LEN ]] || positive_int --max-model-len "$MAX_LEN"
[[ -n $SERVED ]] || SERVED=$(basename "$(cd "$MODEL" && pwd)")
compgen -G "$MODEL/*.safetensors" >/dev/null || note "warning: no *.safetensors in '$MODEL'; vLLM will fail to load weights"
compgen -G "$MODEL/tokenizer*" >/dev/null || note "warning: no tokenizer files in '$MODEL'; pass -- --tokenizer PATH"

cmd=(vllm serve "$MODEL" --host "$HOST" --port "$PORT" --served-model-name "$SERVED"
     --tensor-parallel-size "$TP")
[[ -z $MAX_LEN ]] || cmd+=(--max-model-len "$MAX_LEN")
cmd+=(${EXTRA[@]+"${EXTRA[@]}"})

client=localhost
[[ $HOST == 0.0.0.0 || $HOST == "::" ]] || client=$HOST
body="{\"model\": \"$SERVED\", \"prompt\": \"The capital of France is\", \"max_tokens\": 32, \"temperature\": 0}"
curl_example="curl http://$client:$PORT/v1/completions -H 'Content-Type: application/json' -d '$body'"
if ((DRY_RUN)); then
    show_cmd "${cmd[@]}"
    echo "# once it logs 'Application startup complete', from another shell:"
    echo "# $curl_example"
else
    require_tool vllm "pip install vllm (GPU) or vllm-tpu (TPU VM), or use --dry-run"
    note "when it logs 'Application startup complete', try: $curl_example"
    show_cmd "${cmd[@]}" >&2
    exec "${cmd[@]}"
fi
