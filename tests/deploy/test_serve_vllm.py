"""tpu_scripts/serve_vllm.sh: the `vllm serve` command for an exported checkpoint, and its errors."""
import json
import shlex

import pytest


@pytest.fixture
def hf_dir(tmp_path):
    """A folder shaped like `python -m jaxlm.convert export-hf` output (no real weights)."""
    d = tmp_path / "llama2_7b-hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.model").write_bytes(b"")
    return d


def test_dry_run_prints_vllm_serve_and_a_curl_example(hf_dir, guarded_env, run_script):
    r = run_script("serve_vllm.sh", "--dry-run", "--model", hf_dir)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert shlex.split(lines[0][2:]) == [
        "vllm", "serve", str(hf_dir), "--host", "0.0.0.0", "--port", "8000",
        "--served-model-name", "llama2_7b-hf", "--tensor-parallel-size", "1"]
    curl = next(line for line in lines if "curl" in line)
    assert curl.startswith("# curl http://localhost:8000/v1/completions")
    body = json.loads(shlex.split(curl[2:])[-1])
    assert body["model"] == "llama2_7b-hf" and body["max_tokens"] > 0


def test_options_and_passthrough(hf_dir, dry_run):
    [cmd] = dry_run("serve_vllm.sh", "--model", hf_dir, "--port=9000", "--tp", "4",
                    "--max-model-len", "4096", "--served-model-name", "jaxlm", "--host", "127.0.0.1",
                    "--", "--gpu-memory-utilization", "0.85")
    assert cmd == ["vllm", "serve", str(hf_dir), "--host", "127.0.0.1", "--port", "9000",
                   "--served-model-name", "jaxlm", "--tensor-parallel-size", "4",
                   "--max-model-len", "4096", "--gpu-memory-utilization", "0.85"]


def test_real_run_execs_vllm(hf_dir, sandbox, run_script):
    r = run_script("serve_vllm.sh", "--model", hf_dir, "--tp", "2", env=sandbox.env)
    assert r.returncode == 0, r.stderr
    assert sandbox.fake_log.read_bytes().decode().split("\0")[:-1] == [
        "serve", str(hf_dir), "--host", "0.0.0.0", "--port", "8000", "--served-model-name",
        "llama2_7b-hf", "--tensor-parallel-size", "2"]
    assert "curl http://localhost:8000/v1/completions" in r.stderr


@pytest.mark.parametrize("args,needle", [
    ([], "--model is required"),
    (["--model", "/nonexistent/hf"], "--model '/nonexistent/hf' is not a folder"),
    (["--tp", "0"], "--tp '0'"),
    (["--port", "http"], "--port 'http'"),
    (["--port", "70000"], "--port '70000'"),
    (["--max-model-len", "4k"], "--max-model-len '4k'"),
    (["--bogus"], "'--bogus'"),
])
def test_usage_errors(hf_dir, run_script, usage_error, args, needle):
    model = [] if any(a == "--model" for a in args) or not args else ["--model", hf_dir]
    line = usage_error(run_script("serve_vllm.sh", "--dry-run", *model, *args), "serve_vllm.sh",
                       needle)
    if "--model" in needle:
        assert "jaxlm.convert export-hf" in line  # says how to make one


def test_folder_without_config_is_rejected(tmp_path, run_script, usage_error):
    usage_error(run_script("serve_vllm.sh", "--dry-run", "--model", tmp_path), "serve_vllm.sh",
                "has no config.json", "export-hf")


def test_missing_weights_or_tokenizer_warn(hf_dir, run_script):
    (hf_dir / "tokenizer.model").unlink()
    (hf_dir / "model.safetensors").unlink()
    r = run_script("serve_vllm.sh", "--dry-run", "--model", hf_dir)
    assert r.returncode == 0
    assert "no *.safetensors" in r.stderr and "no tokenizer files" in r.stderr
