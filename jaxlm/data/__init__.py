"""Data: TFDS sources, grain pipelines, document packing, exact resume (import the submodules).

    stdlib_corpus.py  the embedded default corpus (the Python standard library)
    documents.py      local text -> documents: modes, eval hold-out, bad-input policy
    tfds_text.py      TFDS builder `local_text` (array_record; no TensorFlow needed)
    sources.py        tfds.data_source for catalogue / local datasets; the tokenise transform
    synthetic.py      synthetic token documents; ByteTokenizer
    packing.py        documents -> fixed [batch, seq_len] rows with segments and positions
    pipeline.py       DataConfig, make_pretrain_iterator (shard, shuffle, workers, resume)
    batching.py       global batch tokens -> rows, per-host batch, accumulation steps
    bench.py, __main__.py   `python -m jaxlm.data build | show | bench`

Kept free of imports: jaxlm.tokenizer imports stdlib_corpus without pulling in grain or TFDS.
"""
