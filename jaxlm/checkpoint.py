"""A model on disk: DIR/config.json (the ModelConfig) + DIR/params (an orbax checkpoint).

Written by `python -m jaxlm.convert import-hf` and the trainer, read by inference and fine-tuning
entry points. DIR may be local or a bucket URL (gs://BUCKET/RUN/model): paths are epath.Paths.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model import Transformer
from jaxlm.paths import as_path
from jaxlm.sharding import state_shardings

FORMAT = "jaxlm-model-v1"


def save_model(directory: str | os.PathLike, model: Transformer) -> epath.Path:
    """Write config.json and params/ under `directory` (created; must not hold params already)."""
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params)
        ckptr.wait_until_finished()
    meta = {"format": FORMAT, "model": model.cfg.to_dict()}
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def config_json(directory: str | os.PathLike) -> dict:
    """DIR/config.json as a dict; {} if it is missing or not a JSON object (jaxlm's or HF's)."""
    try:
        meta = json.loads((as_path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def is_model_directory(directory: str | os.PathLike) -> bool:
    """True if `directory` holds a saved model: config.json of this format and params/."""
    return config_json(directory).get("format") == FORMAT and (as_path(directory) / "params").is_dir()


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    directory = as_path(directory)
    file = directory / "config.json"
    # The two directories people pass by mistake: a trainer workdir (the model is in its model/
    # subdirectory) and a Hugging Face model (config.json with "architectures").
    hint = ""
    if (directory / "model" / "config.json").is_file():
        hint = (f"; this looks like a trainer workdir, whose model is {directory / 'model'}: pass "
                f"that (e.g. --checkpoint {directory / 'model'})")
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not a jaxlm model directory (expected config.json and "
                                f"params/ as written by `python -m jaxlm.convert import-hf`){hint}")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        meta = {}
    if meta.get("format") != FORMAT:
        if not hint and "architectures" in meta:
            hint = (f"; it is a Hugging Face model: convert it first with `python -m "
                    f"jaxlm.convert import-hf --src {directory} --dst OUT` and pass OUT")
        raise ValueError(f"{file}: not a jaxlm model directory (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r}){hint}")
    return ModelConfig.from_dict(meta["model"], source=str(file))


def load_model(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """Restore a model saved by save_model, each parameter directly into its sharding on `mesh`
    (without a mesh: onto jax.default_device if one is set, else the first local device).

    The target sharding is always explicit: without one orbax rebuilds the sharding it saved,
    which only works on the same devices, so a model a pod saved shard by shard would not load
    in generate.py or export-hf on one host."""
    directory = as_path(directory)
    cfg = read_model_config(directory)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    if mesh is not None:
        shardings = state_shardings(abstract, mesh)
    else:
        default = jax.config.jax_default_device  # `with jax.default_device(cpu):` is honoured
        device = default if isinstance(default, jax.Device) else jax.local_devices()[0]
        one = jax.sharding.SingleDeviceSharding(device)
        shardings = jax.tree.map(lambda _: one, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    target = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, abstract), nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        check_saved_shapes(ckptr, directory, target)
        params = ckptr.restore(directory / "params", target)
    state = nnx.state(nnx.merge(graphdef, abstract))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def check_saved_shapes(ckptr: ocp.StandardCheckpointer, directory: epath.Path, target: dict) -> None:
    """Compare the saved arrays' shapes (orbax metadata, nothing read) with those config.json
    implies, so a mismatch is one clear error naming the parameter instead of an orbax trace."""
    want = array_shapes(target)
    got = array_shapes(ckptr.metadata(directory / "params").item_metadata.tree)
    for name in sorted(want.keys() | got.keys()):
        if want.get(name) != got.get(name):
            raise ValueError(
                f"{directory}: parameter {name} is {_describe(got.get(name))} in params/ but "
                f"config.json implies {_describe(want.get(name))}; the checkpoint does not match "
                "its config.json")


def array_shapes(tree, sep: str = ".") -> dict[str, tuple[int, ...]]:
    """{"layers.attn.q": shape} of a tree of arrays, ShapeDtypeStructs or orbax array metadata
    (nested dicts, NamedTuples and lists alike), so a saved tree compares with the one expected."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    return {sep.join(map(name, path)): tuple(leaf.shape) for path, leaf in leaves}


def _describe(shape) -> str:
    return "absent" if shape is None else f"shape {list(shape)}"
