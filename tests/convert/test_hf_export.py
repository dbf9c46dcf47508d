"""jaxlm -> HF export: round trips through transformers, sharding, a trained model, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jaxlm.checkpoint import load_model, save_model
from jaxlm.convert import hf
from jaxlm.convert.export import export_hf, plan_shards

ROOT = Path(__file__).resolve().parents[2]


def _tokens(vocab, shape=(2, 24), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def _all_tensors(path: Path) -> dict:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("arch,extra", [
    ("llama", {}),
    ("mistral", {"sliding_window": 8}),
    ("mixtral", {"sliding_window": 8}),
    ("llama", {"tie_word_embeddings": True, "rope_theta": 500000.0}),
])
def test_round_trip_through_transformers(make_hf_model, tmp_path, arch, extra):
    ref_model, path = make_hf_model(arch, **extra)
    ckpt = save_model(tmp_path / "ckpt", hf.load(path))
    out = export_hf(ckpt, tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(ref_model).__name__]
    # Identical tensors, same names, nothing extra or missing.
    original, exported = _all_tensors(path), _all_tensors(out)
    assert sorted(original) == sorted(exported)
    for name, w in original.items():
        np.testing.assert_array_equal(exported[name], w, err_msg=name)
    # transformers loads the directory as is and gives the original logits.
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    tokens = _tokens(128)
    np.testing.assert_allclose(_logits(loaded.eval(), tokens), _logits(ref_model, tokens), atol=1e-5)
    if arch != "llama":
        assert loaded.config.sliding_window == 8
    if arch == "mixtral":
        assert loaded.config.router_aux_loss_coef == pytest.approx(ref_model.config.router_aux_loss_coef)


def test_sharded_export_has_an_index_transformers_reads(make_hf_model, tmp_path):
    ref_model, path = make_hf_model("mistral", sliding_window=8)
    ckpt = save_model(tmp_path / "ckpt", hf.load(path))
    out = export_hf(ckpt, tmp_path / "hf", max_shard_bytes=60_000, dtype="bfloat16", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    assert all(f.stat().st_size <= 60_000 + 4096 for f in files)  # + the safetensors header
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    tokens = _tokens(128)
    np.testing.assert_allclose(_logits(loaded.eval(), tokens), _logits(ref_model, tokens), atol=0.1)


def test_plan_shards_is_contiguous_and_bounded():
    assert plan_shards([4, 4, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert plan_shards([1, 2, 3], 100) == [[0, 1, 2]]


def test_trained_model_exports_with_its_tokenizer(tmp_path):
    """experiments/pretrain.py (stdlib text, a trained tokenizer) -> export-hf CLI -> transformers
    logits equal jaxlm's, and HF's tokenizer encodes like ours."""
    work = tmp_path / "run"
    cmd = [sys.executable, f"{ROOT}/experiments/pretrain.py", f"--workdir={work}",
           f"--config={ROOT}/experiments/configs/pretrain.py:test", "--config.data.source=stdlib",
           "--config.tokenizer.vocab_size=384", "--config.train.steps=3",
           "--config.train.eval_every=1000", "--config.checkpoint.every_steps=1000"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    dst = tmp_path / "hf"
    export = [sys.executable, "-m", "jaxlm.convert", "export-hf", "--src", str(work / "model"),
              "--dst", str(dst)]
    run = subprocess.run(export, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "exported" in run.stdout

    from jaxlm.tokenizer import Tokenizer
    ours = Tokenizer(work / "model" / "tokenizer.model")
    text = "def main(argv):\n    return 42  # été"
    theirs = transformers.AutoTokenizer.from_pretrained(dst)
    assert theirs(text).input_ids == [ours.bos_id] + ours.encode(text)
    assert theirs.eos_token_id == ours.eos_id

    import jax.numpy as jnp
    model = load_model(work / "model")
    tokens = _tokens(model.cfg.vocab_size, shape=(2, 16))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager")
    np.testing.assert_allclose(_logits(loaded.eval(), tokens),
                               np.asarray(model(jnp.asarray(tokens))), atol=1e-4)
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eos_id


@pytest.fixture
def ckpt(make_hf_model, tmp_path):
    _, path = make_hf_model("llama")
    return save_model(tmp_path / "ckpt", hf.load(path))


def test_shape_mismatch_is_one_error_and_writes_nothing(ckpt, tmp_path):
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["ffn_hidden"] = 128  # params/ hold 96-wide MLPs
    (ckpt / "config.json").write_text(json.dumps(meta))
    dst = tmp_path / "hf"
    run = subprocess.run([sys.executable, "-m", "jaxlm.convert", "export-hf", "--src", str(ckpt),
                          "--dst", str(dst)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert "does not match its config.json" in run.stderr and "layers.mlp.down is shape [2, 96, 64]" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not dst.exists() and not list(tmp_path.glob(".hf.export-*"))


def test_existing_directory_needs_overwrite(ckpt, tmp_path):
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_hf(ckpt, dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    # --overwrite replaces an earlier export, never a folder that is not a model.
    with pytest.raises(FileExistsError, match="only replaces a Hugging Face model directory"):
        export_hf(ckpt, dst, overwrite=True, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    (dst / "keep.txt").unlink()
    export_hf(ckpt, dst, progress=False)
    (dst / "stale.txt").write_text("from the earlier export")
    export_hf(ckpt, dst, overwrite=True, progress=False)
    assert (dst / "model.safetensors").is_file() and not (dst / "stale.txt").exists()


def test_moe_every_other_layer_cannot_be_mixtral(tmp_path):
    from flax import nnx

    from jaxlm.config import get_preset
    from jaxlm.model import Transformer
    import dataclasses
    cfg = get_preset("test_moe")
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, every=2))
    ckpt = save_model(tmp_path / "ckpt", Transformer(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="moe.every=2"):
        export_hf(ckpt, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_overwrite_never_replaces_the_source(ckpt):
    with pytest.raises(ValueError, match="overlap"):
        export_hf(ckpt, ckpt, overwrite=True, progress=False)
    assert (ckpt / "params").is_dir()
