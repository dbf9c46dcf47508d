# shellcheck shell=bash
# Sourced on a cloud VM (remote/install.sh, sky/serve_vllm.yaml): puts uv on PATH, installing it
# for this user first if the image lacks it. uv makes venvs with any Python version (it
# downloads one when the image's python3 is too old) and installs packages fast.
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null; then
    python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
