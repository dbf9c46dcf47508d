"""Shared data fixtures: the stdlib corpus built once per session, a tiny SentencePiece model,
and `unpack`, which rebuilds documents from packed batches (the inverse of packing)."""
import numpy as np
import pytest


@pytest.fixture(scope="session")
def stdlib_tfds(tmp_path_factory):
    """BuildResult of the embedded stdlib corpus as local_text (about 2 s to build)."""
    from jaxlm.data.tfds_text import build_local_text

    return build_local_text("stdlib", str(tmp_path_factory.mktemp("stdlib_tfds")))


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    """A 400-piece Llama-2-style SentencePiece model trained on a few stdlib files (< 1 s)."""
    import itertools

    from jaxlm.data import stdlib_corpus
    from jaxlm.tokenizer import Tokenizer, train_tokenizer

    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("".join(itertools.islice(stdlib_corpus.iter_documents(), 20)))
    return Tokenizer(train_tokenizer(str(d / "corpus.txt"), d / "tok", vocab_size=400,
                                     progress=False, num_threads=1))


def _unpack(batches, bos=1, eos=2):
    """Documents (token lists) rebuilt from batches read in order: a segment starting with BOS
    opens a document, any other continues the open one; EOS as a target closes it. Asserts the
    packing invariants on the way: contiguous segments, targets = next inputs."""
    docs, cur = [], None
    for batch in batches:
        for r in range(batch["inputs"].shape[0]):
            seg = batch["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                cols = np.nonzero(seg == s)[0]
                assert (np.diff(cols) == 1).all(), "a segment must be contiguous"
                inp, tgt = batch["inputs"][r, cols], batch["targets"][r, cols]
                assert (tgt[:-1] == inp[1:]).all(), "targets are the next inputs in a segment"
                np.testing.assert_array_equal(batch["positions"][r, cols], np.arange(len(cols)))
                if cur is None:
                    assert inp[0] == bos, "a document starts with BOS"
                    cur = [bos]
                else:
                    assert cols[0] == 0, "only a row's first segment continues a document"
                cur += tgt.tolist()
                if tgt[-1] == eos:
                    docs.append(cur)
                    cur = None
    assert cur is None, "every document must end"
    return docs


@pytest.fixture
def unpack():
    return _unpack
