"""jaxlm.checkpoint: a model saved with its parameters sharded over a mesh (as every process of a
pod saves the final model) loads on one device, as generate.py and export-hf load it."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.checkpoint import load_model, save_model
from jaxlm.config import get_preset
from jaxlm.model import Transformer
from jaxlm.sharding import MeshConfig, make_mesh, shard_model

LOAD = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jaxlm.checkpoint import load_model
assert jax.device_count() == 1, jax.devices()
model = load_model(sys.argv[1])
np.save(sys.argv[2], np.asarray(model(jnp.arange(12, dtype=jnp.int32)[None])))
"""


def test_sharded_save_loads_on_one_device(tmp_path):
    model = Transformer(get_preset("test"), rngs=nnx.Rngs(0))
    mesh = make_mesh(MeshConfig(fsdp=-1), devices=jax.devices())
    sharded = shard_model(model, mesh)
    assert len(sharded.lm_head[...].sharding.device_set) == jax.device_count() == 8
    save_model(tmp_path / "model", sharded)
    expected = np.asarray(model(jnp.arange(12, dtype=jnp.int32)[None]))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "model"), str(tmp_path / "out.npy")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
    # In-process without a mesh, the parameters land on one device.
    loaded = load_model(tmp_path / "model")
    assert loaded.lm_head[...].sharding.device_set == {jax.local_devices()[0]}
    with jax.default_device(jax.devices()[3]):  # e.g. the CPU, to keep an export off the TPU
        loaded = load_model(tmp_path / "model")
    assert loaded.lm_head[...].sharding.device_set == {jax.devices()[3]}
