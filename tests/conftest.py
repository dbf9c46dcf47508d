"""Test set-up: 8 emulated CPU devices, so every mesh test runs anywhere.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it happens here at
conftest import time.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the test process and the subprocesses it starts
# (the pretrain / generate CLIs): the same programs compile once per machine, not per run.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


def pytest_runtest_setup(item):
    # Hardware markers skip with a reason instead of failing where the hardware is absent.
    for marker, platform in (("tpu", "tpu"), ("gpu", "gpu")):
        if item.get_closest_marker(marker):
            import jax

            if jax.default_backend() != platform:
                pytest.skip(f"needs a {platform.upper()} (backend here: {jax.default_backend()})")


# Tiny Hugging Face reference models ------------------------------------------------------------
TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5)
TINY_MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="session")
def make_hf_model(tmp_path_factory):
    """make_hf_model(arch, **config) -> (torch model in eval mode, saved directory).

    arch: "llama", "mistral" or "mixtral" (4 experts, top-2 unless overridden). Random weights
    from a fixed torch seed; eager attention so the reference is the plain softmax formula.
    Cached per (arch, config) for the session.
    """
    cache = {}

    def make(arch: str = "llama", **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            import torch
            import transformers

            cls_cfg, cls_model = {
                "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
            }[arch]
            extra = TINY_MIXTRAL if arch == "mixtral" else {}
            cfg = cls_cfg(**{**TINY_HF, **extra, **overrides})
            cfg._attn_implementation = "eager"
            torch.manual_seed(0)
            model = cls_model(cfg).eval()
            path = tmp_path_factory.mktemp(f"hf_{arch}")
            model.save_pretrained(path)
            cache[key] = (model, path)
        return cache[key]

    return make
