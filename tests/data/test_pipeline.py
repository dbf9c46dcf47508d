"""The pretraining pipeline: config checks, shapes, epochs, host sharding, exact resume."""
import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlm.data.packing import FIELDS
from jaxlm.data.pipeline import DataConfig, document_dataset, make_pretrain_iterator
from jaxlm.data.synthetic import ByteTokenizer

SYN = DataConfig(source="synthetic", seq_len=32, batch_size=4, synthetic_docs=50,
                 synthetic_min_len=3, synthetic_max_len=70)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in FIELDS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """23 small files with distinct text, and the local: source built from them."""
    d = tmp_path_factory.mktemp("texts")
    for i in range(23):
        (d / f"doc{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum ✓ " * (i % 7 + 1))
    return d


@pytest.mark.parametrize("field,value,match", [
    ("source", "hf:c4", "source="), ("seq_len", 0, "seq_len"), ("batch_size", -1, "batch_size"),
    ("num_epochs", 0, "num_epochs"), ("seed", -1, "seed"), ("worker_count", -2, "worker_count"),
    ("mode", "xml", "mode"), ("eval_fraction", 1.5, "eval_fraction"), ("source", "tfds:", "tfds")])
def test_config_is_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**{field: value})


def test_synthetic_batches_shapes_and_determinism():
    a = take(make_pretrain_iterator(SYN, None, 0, 1), 5)
    for b in a:
        assert set(b) == set(FIELDS)
        assert all(v.dtype == np.int32 and v.shape == (4, 32) for v in b.values())
        assert b["loss_mask"].all()  # an endless stream is never padded
    assert_batches_equal(a, take(make_pretrain_iterator(SYN, None, 0, 1), 5))
    other = take(make_pretrain_iterator(dataclasses.replace(SYN, seed=1), None, 0, 1), 1)
    assert not np.array_equal(other[0]["inputs"], a[0]["inputs"])
    for b in a:  # "pattern" documents: a constant step modulo the non-special ids
        for r, s in zip(*np.nonzero(b["segment_ids"][:, :1] > 0)):
            for seg in range(1, b["segment_ids"][r].max() + 1):
                cols = b["segment_ids"][r] == seg
                toks = np.concatenate([b["inputs"][r, cols], b["targets"][r, cols][-1:]])
                assert len(set(np.diff(toks[toks >= 3] - 3) % (256 - 3))) <= 1


def test_each_epoch_is_a_new_permutation_of_the_shard():
    cfg = dataclasses.replace(SYN, num_epochs=3)
    ds, _ = document_dataset(cfg, None, 0, 1)
    docs = [tuple(d) for d in ds]
    epochs = [docs[i * 50:(i + 1) * 50] for i in range(3)]
    assert len(docs) == 150 and all(set(e) == set(epochs[0]) and len(set(e)) == 50 for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # pairwise different (a != b != c never compares a with c)


def test_four_hosts_read_disjoint_shards_that_cover_the_data(text_dir, tmp_path, unpack):
    tok = ByteTokenizer()
    cfg = DataConfig(source=f"local:{text_dir}/*.txt", data_dir=str(tmp_path), seq_len=16,
                     batch_size=3, num_epochs=1)
    per_host = []
    for p in range(4):
        batches = list(make_pretrain_iterator(cfg, tok, process_index=p, process_count=4))
        per_host.append([tok.decode(d) for d in unpack(batches)])
    train = [ex["text"].decode() for ex in tfds.data_source(
        make_pretrain_iterator(cfg, tok, 0, 4).get_state()["check"]["source"],
        data_dir=str(tmp_path), split="train", download=False)]
    every = [t for host in per_host for t in host]
    assert sorted(every) == sorted(train)  # covered, and nothing read twice
    assert all(len(host) in (len(train) // 4, len(train) // 4 + 1) for host in per_host)


def test_sentencepiece_stdlib_eval_split_round_trip(stdlib_tfds, spm_tokenizer, unpack):
    cfg = DataConfig(source="stdlib", data_dir=stdlib_tfds.data_dir, split="validation",
                     seq_len=128, batch_size=4, num_epochs=1)
    batches = list(make_pretrain_iterator(cfg, spm_tokenizer, 0, 1))
    last = batches[-1]
    assert (last["loss_mask"] == 0).any() and (last["positions"][last["loss_mask"] == 0] == -1).all()
    texts = [ex["text"].decode() for ex in tfds.data_source(
        stdlib_tfds.name, data_dir=stdlib_tfds.data_dir, split="validation", download=False)]
    want = sorted(spm_tokenizer.encode(t, bos=True, eos=True) for t in texts)
    assert sorted(unpack(batches)) == want  # every token of every document, once


def test_state_is_checked_against_the_config():
    it = make_pretrain_iterator(SYN, None, 0, 1)
    next(it)
    state = it.get_state()
    other = make_pretrain_iterator(dataclasses.replace(SYN, seq_len=64), None, 0, 1)
    with pytest.raises(ValueError, match="seq_len=32, 64"):
        other.set_state(state)
    with pytest.raises(ValueError, match="not a data iterator state"):
        it.set_state({"next_index": 3})


def test_grain_orbax_handler_round_trip(tmp_path):
    import grain
    from etils import epath

    it = make_pretrain_iterator(SYN, None, 0, 1)
    take(it, 3)
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
    want = take(it, 2)
    fresh = make_pretrain_iterator(SYN, None, 0, 1)
    grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=fresh)
    assert_batches_equal(take(fresh, 2), want)


RESUME = textwrap.dedent("""
    import json, sys
    import numpy as np
    from jaxlm.data.pipeline import DataConfig, make_pretrain_iterator
    from jaxlm.tokenizer import Tokenizer

    if __name__ == "__main__":  # grain starts workers with spawn, which imports this file
        jobs = json.load(open(sys.argv[1]))
        for i, job in enumerate(jobs):
            tok = Tokenizer(job["tokenizer"]) if job["tokenizer"] else None
            it = make_pretrain_iterator(DataConfig(**job["config"]), tok, 0, 1)
            it.set_state(job["state"])
            batches = [next(it) for _ in range(job["m"])]
            it.close()
            np.savez(f"{sys.argv[2]}/job{i}.npz", **{f"{j}_{k}": v for j, b in
                     enumerate(batches) for k, v in b.items()})
""")


def test_resume_in_a_new_process_with_other_workers_is_exact(text_dir, tmp_path, spm_tokenizer):
    """N batches, state saved as JSON; a new process restores it (local text read by 2 worker
    processes, synthetic in-process) and its next M batches equal the uninterrupted run's."""
    local = DataConfig(source=f"local:{text_dir}/*.txt", data_dir=str(tmp_path / "tfds"),
                       seq_len=24, batch_size=2, eval_fraction=0.0)
    jobs, want = [], []
    for cfg, tok, n, m in [(local, spm_tokenizer, 5, 6), (SYN, None, 7, 4)]:
        full = take(make_pretrain_iterator(cfg, tok, 0, 1), n + m)  # uninterrupted
        it = make_pretrain_iterator(cfg, tok, 0, 1)
        assert_batches_equal(take(it, n), full[:n])
        child = dataclasses.replace(cfg, worker_count=2) if tok else cfg
        jobs.append({"config": dataclasses.asdict(child), "state": it.get_state(), "m": m,
                     "tokenizer": str(tok.path) if tok else None})
        want.append(full[n:])
    assert jobs[0]["state"]["offset"] > 0 or jobs[0]["state"]["doc"] > 0
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))  # the state survives JSON
    (tmp_path / "resume.py").write_text(RESUME)
    subprocess.run([sys.executable, str(tmp_path / "resume.py"), str(tmp_path / "jobs.json"),
                    str(tmp_path)], check=True, timeout=120)
    for i, batches in enumerate(want):
        got = np.load(tmp_path / f"job{i}.npz")
        assert_batches_equal([{k: got[f"{j}_{k}"] for k in FIELDS} for j in range(len(batches))],
                             batches)
