"""Packing: exact against a brute-force reference; nothing lost or duplicated; exact resume."""
import numpy as np
import pytest

from jaxlm.data.packing import FIELDS, Packer

BOS, EOS = 1, 2


def random_docs(rng, n, max_len):
    """Documents [BOS, body..., EOS] with unique bodies (ids >= 3), body lengths 0..max_len."""
    docs = []
    for _ in range(n):
        body = rng.integers(3, 1000, size=int(rng.integers(0, max_len + 1)))
        docs.append(np.concatenate([[BOS], body, [EOS]]).astype(np.int32))
    return docs


def reference_batches(docs, seq_len, batch_size):
    """The policy written as plainly as possible: a flat list of (doc, i) pairs cut into rows."""
    pairs = [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - 1)]
    rows = [pairs[s:s + seq_len] for s in range(0, len(pairs), seq_len)]
    rows += [[]] * (-len(rows) % batch_size)  # the last batch is padded with empty rows
    out = []
    for b in range(0, len(rows), batch_size):
        batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in FIELDS}
        batch["positions"][:] = -1
        for r, row in enumerate(rows[b:b + batch_size]):
            seg, pos, prev = 0, 0, None
            for c, (d, i) in enumerate(row):
                if d != prev:  # a new segment at each document (and at each row start)
                    seg, pos, prev = seg + 1, 0, d
                batch["inputs"][r, c] = docs[d][i]
                batch["targets"][r, c] = docs[d][i + 1]
                batch["segment_ids"][r, c] = seg
                batch["positions"][r, c] = pos
                batch["loss_mask"][r, c] = 1
                pos += 1
        out.append(batch)
    return out


@pytest.mark.parametrize("seq_len,batch_size,max_len", [(16, 2, 40), (7, 3, 3), (1, 4, 5),
                                                        (64, 1, 200)])
def test_packer_equals_reference_and_loses_nothing(seq_len, batch_size, max_len, unpack):
    docs = random_docs(np.random.default_rng(seq_len), 50, max_len)
    got = list(Packer(iter(docs), seq_len, batch_size))
    want = reference_batches(docs, seq_len, batch_size)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(FIELDS)
        for k in FIELDS:
            assert g[k].dtype == np.int32 and g[k].shape == (batch_size, seq_len)
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    # tokens in = tokens out: every document comes back whole, once, in order
    assert unpack(got) == [d.tolist() for d in docs]
    # every pair is trained on exactly once: no token lost, none duplicated
    assert sum(int(b["loss_mask"].sum()) for b in got) == sum(len(d) - 1 for d in docs)


def test_segments_positions_and_masks_on_a_small_example():
    docs = [np.array([1, 10, 11, 2]), np.array([1, 20, 2]), np.array([1, 30, 31, 32, 33, 2])]
    (b,) = list(Packer(iter(docs), seq_len=5, batch_size=3))
    np.testing.assert_array_equal(b["inputs"], [[1, 10, 11, 1, 20], [1, 30, 31, 32, 33], [0] * 5])
    np.testing.assert_array_equal(b["targets"], [[10, 11, 2, 20, 2], [30, 31, 32, 33, 2], [0] * 5])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [0] * 5])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [-1] * 5])
    np.testing.assert_array_equal(b["loss_mask"], [[1] * 5, [1] * 5, [0] * 5])


def test_long_document_continues_across_rows_with_positions_from_zero():
    doc = np.arange(3, 3 + 11)
    doc[0], doc[-1] = BOS, EOS  # 11 tokens = 10 pairs over rows of 4: 4 + 4 + 2
    (b,) = list(Packer(iter([doc]), seq_len=4, batch_size=3))
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, -1, -1]])
    np.testing.assert_array_equal(b["inputs"].ravel()[:10], doc[:-1])
    np.testing.assert_array_equal(b["targets"].ravel()[:10], doc[1:])


def test_resume_from_any_batch_boundary_gives_the_same_rest():
    docs = random_docs(np.random.default_rng(0), 30, 25)
    full = list(Packer(iter(docs), 8, 2))
    p = Packer(iter(docs), 8, 2)
    for n in range(len(full)):
        state = (p.doc, p.offset)
        rest = list(Packer(iter(docs[state[0]:]), 8, 2, doc=state[0], offset=state[1]))
        assert len(rest) == len(full) - n
        for g, w in zip(rest, full[n:]):
            for k in FIELDS:
                np.testing.assert_array_equal(g[k], w[k])
        next(p)


def test_documents_without_pairs_are_skipped_and_bad_state_is_an_error():
    docs = [np.array([1]), np.array([1, 5, 2])]
    (b,) = list(Packer(iter(docs), 4, 1))
    np.testing.assert_array_equal(b["inputs"], [[1, 5, 0, 0]])
    with pytest.raises(ValueError, match="different data"):
        next(Packer(iter([np.array([1, 5, 2])]), 4, 1, doc=0, offset=7))
    assert list(Packer(iter([]), 4, 1)) == []
