"""End to end: tiny random HF Llama / Mistral, imported with jaxlm.convert, continue a prompt
greedily with exactly the token ids of transformers' generate; also through the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from jaxlm.convert import hf
from jaxlm.inference.generate import generate

PROMPT = [1, 45, 99, 7, 23, 64, 12, 88, 31, 5]
NEW = 30
EOS = 2


def hf_greedy(model, prompt, new):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                             eos_token_id=EOS, pad_token_id=0)
    ids = out[0, len(prompt):].tolist()
    return ids[:ids.index(EOS)] if EOS in ids else ids


def test_llama_greedy_matches_transformers(make_hf_model):
    ref, path = make_hf_model("llama")
    expected = hf_greedy(ref, PROMPT, NEW)
    got = generate(hf.load(path), [PROMPT], max_new_tokens=NEW, eos_id=EOS).tokens[0]
    assert got == expected and len(got) > 5


def test_mistral_rolling_buffer_cli_matches_transformers(make_hf_model, tmp_path):
    # Window 8 < prompt 10 < prompt + 30 new tokens: chunked prefill and a wrapping buffer.
    ref, path = make_hf_model("mistral", sliding_window=8)
    expected = hf_greedy(ref, PROMPT, NEW)
    dst = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "jaxlm.convert", "import-hf", "--src", str(path),
                    "--dst", str(dst)], check=True, capture_output=True)
    script = Path(__file__).resolve().parents[2] / "experiments" / "generate.py"
    run = subprocess.run([sys.executable, str(script), "--checkpoint", str(dst), "--prompt_ids",
                          ",".join(map(str, PROMPT)), "--max_new_tokens", str(NEW),
                          "--temperature", "0", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # No tokenizer in the checkpoint, so no eos: compare up to HF's eos.
    got = json.loads(run.stdout.strip().splitlines()[-1])["ids"]
    assert got[:len(expected)] == expected and len(expected) > 5


def test_cli_errors(tmp_path):
    script = Path(__file__).resolve().parents[2] / "experiments" / "generate.py"
    run = subprocess.run([sys.executable, str(script), "--checkpoint", str(tmp_path / "none"),
                          "--prompt_ids", "1,2"], capture_output=True, text=True)
    assert run.returncode == 2 and "not a jaxlm model directory" in run.stderr
    assert "Traceback" not in run.stderr
