"""Pretraining experiment configs (ml_collections). Select a preset after the colon:

    python experiments/pretrain.py --workdir runs/tiny --config=experiments/configs/pretrain.py:tiny \
        --config.train.steps=200 --config.checkpoint.every_steps=50

Presets: tiny (CPU demo, 10.5M parameters), tiny_moe (its active size, 8 experts top-2), test and
test_moe (seconds, synthetic data), llama2_7b, llama2_70b,
mistral_7b (TPU pod shapes: Llama 2 §2.2 recipe, 4M-token batches, mesh per preset).
"""
from ml_collections import ConfigDict, config_dict

# Every ModelConfig field, with the type the command line parses it as (lock_config: only fields
# that exist can be set). sliding_window=0 means full attention (it disables a preset's window).
MODEL_FIELDS = {
    "vocab_size": int, "d_model": int, "n_layers": int, "n_heads": int, "n_kv_heads": int,
    "head_dim": int, "ffn_hidden": int, "max_seq_len": int, "sliding_window": int,
    "rope_theta": float, "norm_eps": float, "tie_embeddings": bool, "init_std": float,
    "dtype": str, "param_dtype": str, "remat": str,
}
# ... and every MoEConfig field, under model.overrides.moe: changes the preset's MoE, with
# n_experts makes a dense preset a MoE one (--config.model.overrides.moe.n_experts=8), and with
# n_experts=0 a MoE preset dense.
MOE_FIELDS = {
    "n_experts": int, "top_k": int, "every": int, "capacity_factor": float,
    "eval_capacity_factor": float, "group_size": int, "dispatch": str, "gate": str,
    "router_jitter": float, "load_balance_coef": float, "router_z_coef": float,
}


class ModelOverrides(ConfigDict):
    """ModelConfig fields to change from the preset's: --config.model.overrides.remat=full,
    --config.model.overrides.moe.n_experts=16.

    Every field is a typed placeholder (None = keep the preset's value) so that it can be set
    from the command line under lock_config; to_dict() leaves the unset ones out, so whatever
    reads the experiment (jaxlm.train.experiment.resolve, jaxlm.train.aot) sees only real
    overrides. A None can therefore not override a value: sliding_window=0 is how to turn a
    preset's window off.
    """

    def to_dict(self, visit_map=None, preserve_field_references=False):
        d = super().to_dict(visit_map, preserve_field_references)
        for key in [k for k, v in d.items() if v is None or v == {}]:
            del d[key]  # in place: ConfigDict.to_dict keeps this dict in its visit_map
        return d


def model_overrides(moe: dict | None = None, **values) -> ModelOverrides:
    o = ModelOverrides({k: config_dict.placeholder(t) for k, t in MODEL_FIELDS.items()})
    o.moe = ModelOverrides({k: config_dict.placeholder(t) for k, t in MOE_FIELDS.items()})
    o.update(values)
    o.moe.update(moe or {})
    return o


def base() -> ConfigDict:
    c = ConfigDict()
    # Model: a jaxlm.config preset plus field overrides (dtype, remat, ...). vocab_size is set from
    # the tokenizer (padded to a multiple of 128) unless the data source is synthetic.
    c.model = ConfigDict({"preset": "tiny", "overrides": model_overrides()})
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "expert": 1, "tensor": 1,
                         "dcn_data": -1, "dcn_fsdp": 1, "dcn_expert": 1, "dcn_tensor": 1})
    c.tokenizer = ConfigDict({
        "path": "",             # a SentencePiece .model; "" = WORKDIR/tokenizer/tokenizer.model
        "train_if_missing": True,  # train one on the data source (stdlib / local:GLOB) first
        "vocab_size": 8192,
    })
    c.data = ConfigDict({
        "source": "stdlib", "data_dir": "", "split": "train", "eval_split": "validation",
        "text_field": "text", "worker_count": 0, "seed": 0,
    })
    c.train = ConfigDict({
        "steps": 600,
        "seq_len": 256,
        "global_batch_tokens": 8 * 256,   # Llama 2: 4M (1024 rows x 4096)
        "micro_batch_per_device": 8,      # rows per device per forward/backward pass
        "z_loss": 0.0,
        "seed": 0,
        "log_every": 10,
        "eval_every": 100,
        "eval_batches": 8,
        "max_bad_steps": 5,               # stop after this many non-finite steps in a row
        "inject_nan_at": (),              # fault injection for tests: NaN in the batch of these steps (1-based)
        "sample_prompt": "def ",          # printed with a greedy continuation at the end
        "sample_tokens": 48,
    })
    c.optim = ConfigDict({
        "peak_lr": 3e-4, "warmup_steps": 2000, "final_lr_fraction": 0.1, "b1": 0.9, "b2": 0.95,
        "eps": 1e-5, "weight_decay": 0.1, "clip_norm": 1.0,
    })
    c.checkpoint = ConfigDict({"every_steps": 100, "keep": 3, "async_save": True})
    return c


def get_config(preset: str = "tiny") -> ConfigDict:
    c = base()
    if preset == "tiny":
        # 10.5M parameters, 4 x 256-token rows per step: ~10 minutes on 2 CPU cores.
        c.model.preset = "tiny"
        c.train.update(steps=200, global_batch_tokens=4 * 256, micro_batch_per_device=4,
                       log_every=5, eval_every=50)
        c.optim.update(peak_lr=2e-3, warmup_steps=20)
        c.checkpoint.update(every_steps=50)
    elif preset == "tiny_moe":
        # tiny's active size with 8 experts (top-2, capacity dispatch: the fast path on CPU).
        c = get_config("tiny")
        c.model.preset = "tiny_moe"
    elif preset in ("test", "test_moe"):
        c.model.preset = preset
        c.data.source = "synthetic"
        c.train.update(steps=20, seq_len=32, global_batch_tokens=8 * 32, micro_batch_per_device=1,
                       log_every=1, eval_every=10, eval_batches=2, sample_prompt="")
        c.optim.update(peak_lr=1e-2, warmup_steps=2)
        c.checkpoint.update(every_steps=5, keep=10)
    elif preset in ("llama2_7b", "llama2_70b", "mistral_7b"):
        # Llama 2 §2.2: 4M-token batches of 4096-token rows, AdamW 0.9/0.95/1e-5, wd 0.1,
        # clip 1.0, 2000 warmup steps, cosine to 10%; peak 3e-4 (7B) or 1.5e-4 (70B).
        c.model.preset = preset
        c.model.overrides.update(dtype="bfloat16", remat="dots")
        c.tokenizer.update(vocab_size=32000)
        c.data.update(source="tfds:c4/en", data_dir="gs://YOUR_BUCKET/tfds", worker_count=8)
        seq = 8192 if preset == "mistral_7b" else 4096
        c.train.update(steps=500_000, seq_len=seq, global_batch_tokens=4 * 1024 * 1024,
                       micro_batch_per_device=1, log_every=10, eval_every=1000, eval_batches=32)
        c.optim.update(peak_lr=1.5e-4 if preset == "llama2_70b" else 3e-4, warmup_steps=2000)
        c.checkpoint.update(every_steps=1000, keep=3)
        # Mesh: FSDP across the slice. For 70B, pure FSDP with full remat fits v5p-128 at 52 GiB
        # per chip (docs/tpu_scaling.md, checked with experiments/aot_check.py against the TPU
        # compiler); fsdp=8 x tensor=8 needed 151 GB when the batch planner still put tensor x
        # micro_batch_per_device rows on each chip, and has not been re-measured since.
        if preset == "llama2_70b":
            c.mesh.update(fsdp=-1, tensor=1)
            c.model.overrides.remat = "full"
    else:
        raise ValueError(f"unknown pretrain preset {preset!r}: tiny, tiny_moe, test, test_moe, "
                         "llama2_7b, llama2_70b, mistral_7b")
    return c
