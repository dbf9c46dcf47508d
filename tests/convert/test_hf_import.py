"""HF transformers Llama / Mistral -> jaxlm: logits parity, sharded files, CLI, malformed input."""
import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from jaxlm.checkpoint import load_model
from jaxlm.convert import hf
from jaxlm.convert.__main__ import import_hf


def _tokens(vocab, shape=(2, 24), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("arch,extra", [
    ("llama", {}),
    ("llama", {"num_key_value_heads": 4}),                 # plain multi-head
    ("mistral", {"sliding_window": 8}),                     # GQA + window shorter than T=24
    ("llama", {"tie_word_embeddings": True, "rope_theta": 500000.0}),
])
def test_logits_match_transformers(make_hf_model, arch, extra):
    ref_model, path = make_hf_model(arch, **extra)
    tokens = _tokens(128)
    model = hf.load(path)
    if arch == "mistral":
        assert model.cfg.sliding_window == 8
    got = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, _hf_logits(ref_model, tokens), atol=1e-4)


def test_sharded_safetensors_index(make_hf_model, tmp_path):
    ref_model, _ = make_hf_model("mistral", sliding_window=8)
    ref_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    tokens = _tokens(128)
    got = np.asarray(hf.load(tmp_path)(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, _hf_logits(ref_model, tokens), atol=1e-4)


def test_cli_import_then_load_model(make_hf_model, tmp_path):
    ref_model, path = make_hf_model("mistral", sliding_window=8)
    dst = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "jaxlm.convert", "import-hf", "--src", str(path), "--dst", str(dst)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "imported" in run.stdout
    tokens = _tokens(128)
    got = np.asarray(load_model(dst)(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, _hf_logits(ref_model, tokens), atol=1e-4)
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr


@pytest.fixture
def broken_copy(make_hf_model, tmp_path):
    """A writable copy of a tiny Llama directory and its tensors, for corrupting."""
    _, path = make_hf_model("llama")
    dst = tmp_path / "broken"
    shutil.copytree(path, dst)
    return dst, load_file(dst / "model.safetensors")


def test_missing_tensor_is_named(broken_copy):
    path, tensors = broken_copy
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        hf.load(path)


def test_wrong_shape_is_named(broken_copy):
    path, tensors = broken_copy
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                                         r"\[16, 64\], expected \[32, 64\]"):
        hf.load(path)


def test_unexpected_tensor_is_named(broken_copy):
    path, tensors = broken_copy
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.q_proj.bias'\]"):
        hf.load(path)


def test_bad_directories(broken_copy, tmp_path):
    path, _ = broken_copy
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load(tmp_path / "nowhere")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported"):
        hf.load(path)
    (path / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match="ModelConfig.n_kv_heads"):
        hf.load(path)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf.load(path)


def test_overwrite_never_deletes_the_source_or_an_unrelated_folder(make_hf_model, tmp_path):
    from jaxlm.convert.__main__ import main as convert_main

    _, path = make_hf_model("llama")
    src = tmp_path / "hf"
    shutil.copytree(path, src)
    before = sorted(p.name for p in src.iterdir())
    for dst in (src, src / "sub"):  # --dst == --src, or inside it
        with pytest.raises(ValueError, match="overlap"):
            import_hf(str(src), str(dst), overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="only replaces a jaxlm model directory"):
        import_hf(str(src), str(mine), overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    assert convert_main(["import-hf", "--src", str(src), "--dst", str(tmp_path / "file")]) == 2
    # A jaxlm model is replaced; nothing is left beside it.
    dst = tmp_path / "ckpt"
    import_hf(str(src), str(dst))
    import_hf(str(src), str(dst), overwrite=True)
    assert load_model(dst).cfg.n_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "file", "hf", "mine"]


def test_failed_import_leaves_the_old_model(make_hf_model, tmp_path, monkeypatch):
    import jaxlm.checkpoint

    _, path = make_hf_model("llama")
    dst = tmp_path / "ckpt"
    import_hf(str(path), str(dst))
    saved = (dst / "config.json").read_text()

    def interrupted(directory, model):
        (directory / "config.json").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxlm.checkpoint, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_hf(str(path), str(dst), overwrite=True)
    assert (dst / "config.json").read_text() == saved and (dst / "params").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_ctrl_c_prints_interrupted(make_hf_model, tmp_path, monkeypatch, capsys):
    from jaxlm.convert.__main__ import main as convert_main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    _, path = make_hf_model("llama")
    monkeypatch.setattr(hf, "load", interrupted)
    assert convert_main(["import-hf", "--src", str(path), "--dst", str(tmp_path / "ckpt")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert not list(tmp_path.iterdir())


def test_config_missing_a_field_and_truncated_index_are_named(broken_copy, make_hf_model, tmp_path):
    path, _ = broken_copy
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match=r"config.json: required field\(s\) hidden_size missing"):
        hf.load(path)
    ref_model, _ = make_hf_model("llama")
    sharded = tmp_path / "sharded"
    ref_model.save_pretrained(sharded, max_shard_size="100KB")
    index = sharded / "model.safetensors.index.json"
    index.write_text(index.read_text()[:50])  # an interrupted download
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: not a safetensors index"):
        hf.load(sharded)


def test_import_reports_progress_per_parameter(make_hf_model, tmp_path, capsys):
    _, path = make_hf_model("llama")
    import_hf(str(path), str(tmp_path / "ckpt"))
    err = capsys.readouterr().err
    assert "reading layers.attn.q (" in err and "reading lm_head (" in err
