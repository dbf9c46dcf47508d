"""From an ml_collections experiment config to the validated pieces the trainer needs.

Modules receive only their own dataclass (DESIGN: data flow); this file is the one place that
reads the experiment ConfigDict, and every error names the config field to change.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import warnings
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from jaxlm.config import ModelConfig, get_preset
from jaxlm.data.batching import BatchPlan, batch_shards, plan_batches
from jaxlm.data.pipeline import DataConfig, make_pretrain_iterator
from jaxlm.model import Transformer
from jaxlm.paths import as_path, is_remote, local_copy
from jaxlm.sharding import MeshConfig, make_mesh
from jaxlm.train.optim import OptimConfig, learning_rate

log = logging.getLogger("jaxlm.train")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    seq_len: int
    global_batch_tokens: int
    micro_batch_per_device: int = 1
    z_loss: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    max_bad_steps: int = 5
    inject_nan_at: tuple = ()
    sample_prompt: str = ""
    sample_tokens: int = 48

    def __post_init__(self):
        for name in ("steps", "seq_len", "global_batch_tokens", "micro_batch_per_device",
                     "log_every", "eval_every", "eval_batches", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.train.{name} must be >= 1, got {getattr(self, name)}")
        if self.z_loss < 0:
            raise ValueError(f"config.train.z_loss must be >= 0, got {self.z_loss}")
        object.__setattr__(self, "inject_nan_at", tuple(int(s) for s in self.inject_nan_at))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100
    keep: int = 3           # orbax max_to_keep: the newest `keep` checkpoints stay
    async_save: bool = True

    def __post_init__(self):
        for name in ("every_steps", "keep"):  # every 0 steps divides by zero; keep 0 keeps none
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"config.checkpoint.{name} must be an integer >= 1, got "
                                 f"{getattr(self, name)!r}")


def maybe_initialize_distributed() -> bool:
    """jax.distributed.initialize() when this process is one of several (a multi-host TPU slice
    or pod, a multi-process Slurm / Open MPI job); a no-op on one host or a CPU. Returns whether
    it initialized.

    Detection, first match wins:
      JAXLM_DISTRIBUTED=1 / =0        force / skip (an override for unusual launchers)
      JAX_COORDINATOR_ADDRESS or MEGASCALE_COORDINATOR_ADDRESS set (tpu_scripts/remote/env.sh,
                                      multislice)
      the cluster jax.distributed.initialize() itself would detect (jax._src.clusters: a GCE
      Cloud TPU VM from its metadata server, GKE from TPU_WORKER_HOSTNAMES, Slurm, Open MPI),
      when it reports more than one process. A single-host TPU VM is such a cluster of one, and
      is left alone.
    """
    override = os.environ.get("JAXLM_DISTRIBUTED", "").strip().lower()
    if override in ("0", "false", "no", "off"):
        return False
    if override in ("1", "true", "yes", "on") or os.environ.get("JAX_COORDINATOR_ADDRESS") or \
            os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or _cluster_processes() > 1:
        jax.distributed.initialize()
        return True
    return False


def _cluster_processes() -> int:
    """Processes of the cluster jax.distributed.initialize() would auto-detect (the same
    ClusterEnv, found the same way), 0 if none. Outside a cluster every check is an environment
    variable; only on a Cloud TPU VM is the metadata server asked."""
    try:
        from jax._src import clusters  # private, but exactly what jax.distributed uses

        with warnings.catch_warnings():  # K8sCluster warns in any pod without `kubernetes`
            warnings.simplefilter("ignore")
            env = next((e for e in clusters.ClusterEnv._cluster_types
                        if not e.opt_in_only_method and e.is_env_present()), None)
    except Exception as e:  # noqa: BLE001  JAX internals moved, metadata server unreachable
        log.warning("cluster detection failed (%s: %s); on a multi-host slice set "
                    "JAXLM_DISTRIBUTED=1", type(e).__name__, e)
        return 0
    if env is None:
        return 0
    try:
        return env.get_process_count()
    except Exception as e:  # noqa: BLE001  present but unreadable: let initialize() report it
        log.warning("%s detected but its process count is unreadable (%s: %s); initializing "
                    "jax.distributed anyway", env.__name__, type(e).__name__, e)
        return 2


@dataclasses.dataclass
class Experiment:
    model: ModelConfig
    model_class: type
    mesh: Any
    plan: BatchPlan
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig
    eval_split: str
    ckpt: CheckpointConfig
    resolved: dict
    tokenizer: Any
    tokenizer_path: epath.Path | None

    @property
    def inject_nan_at(self) -> set[int]:
        return set(self.train.inject_nan_at)

    def learning_rate(self, step: int) -> float:
        return float(learning_rate(self.optim)(step))

    def make_iterator(self, split: str, eval_mode: bool = False):
        cfg = self.data if not eval_mode else dataclasses.replace(
            self.data, split=split, shuffle=False, num_epochs=1, worker_count=0)
        return make_pretrain_iterator(cfg, self.tokenizer)

    def graphdef_for_export(self):
        return nnx.graphdef(nnx.eval_shape(lambda: self.model_class(self.model, rngs=nnx.Rngs(0))))

    def unigram_entropy(self, batches: int = 50) -> float:
        """Entropy (nats) of the held-out split's token distribution: the loss of a model that
        knows token frequencies and nothing else, the baseline a trained LM must beat."""
        counts = np.zeros(self.model.vocab_size, np.int64)
        it = self.make_iterator(self.eval_split, eval_mode=True)
        try:
            for _ in range(batches):
                try:
                    b = next(it)
                except StopIteration:
                    break
                counts += np.bincount(b["targets"][b["loss_mask"] > 0], minlength=counts.size)
        finally:
            it.close()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def preset_overrides(c: dict, seq_len: int) -> dict:
    """The ModelConfig fields config.model.overrides sets (None = keep the preset's value: the
    config declares every field so the CLI can set it), max_seq_len at least seq_len.

    sliding_window=0 turns the preset's window off (full attention). overrides.moe changes the
    preset's MoEConfig fields, makes a dense preset a MoE one when it sets n_experts, and a MoE
    preset dense with n_experts=0."""
    set_ = lambda d: {k: v for k, v in (d or {}).items() if v is not None}
    overrides = set_(c["model"].get("overrides"))
    preset = get_preset(c["model"]["preset"])
    moe = set_(overrides.pop("moe", None))
    if moe.get("n_experts") == 0:  # 0 experts: the dense decoder (a MoE preset's SwiGLU FFN)
        if len(moe) > 1:
            raise ValueError("config.model.overrides.moe: n_experts=0 makes the model dense; leave "
                             f"the other MoE fields unset (got {sorted(set(moe) - {'n_experts'})})")
        overrides["moe"] = None
    elif moe:
        if preset.moe is None and "n_experts" not in moe:
            raise ValueError(f"config.model.overrides.moe: preset {c['model']['preset']!r} is dense; "
                             "set config.model.overrides.moe.n_experts too to make it a MoE model")
        base = preset.moe.to_dict() if preset.moe is not None else {}
        overrides["moe"] = {**base, **moe}
    if overrides.get("sliding_window") == 0:
        overrides["sliding_window"] = None  # 0 = no window: full causal attention
    overrides.setdefault("max_seq_len", max(seq_len, preset.max_seq_len))
    return overrides


def resolve(config, workdir: epath.Path) -> Experiment:
    """Validate the whole experiment before anything compiles; errors name the config field."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    train = TrainConfig(**c["train"])
    ckpt = CheckpointConfig(**c["checkpoint"])
    try:
        optim = OptimConfig(total_steps=train.steps, **c["optim"])
    except ValueError as e:  # OptimConfig is shared with SFT / RLHF: name this config's fields
        message = str(e).replace("OptimConfig.total_steps", "total_steps")
        raise ValueError(message.replace("OptimConfig.", "config.optim.").replace(
            "total_steps", "config.train.steps")) from None
    tokenizer, tok_path = _tokenizer(c, workdir, train.seed)
    overrides = preset_overrides(c, train.seq_len)
    if tokenizer is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = tokenizer.padded_vocab_size()
    model = get_preset(c["model"]["preset"], **overrides)
    if tokenizer is not None:
        from jaxlm.tokenizer import check_model_vocab

        check_model_vocab(tokenizer, model.vocab_size)
    mesh = make_mesh(MeshConfig(**c["mesh"]))
    # The batch splits over data x fsdp x expert only: with tensor=T, T chips share each row.
    plan = plan_batches(train.global_batch_tokens, train.seq_len, batch_shards(mesh.shape),
                        jax.process_count(), train.micro_batch_per_device)
    d = c["data"]
    data = DataConfig(source=d["source"], data_dir=d["data_dir"] or None, split=d["split"],
                      text_field=d["text_field"], seq_len=train.seq_len,
                      batch_size=plan.per_host_batch, seed=d["seed"],
                      worker_count=d["worker_count"], synthetic_vocab=model.vocab_size)
    if data.source != "synthetic":
        _check_splits(data, d["eval_split"])
    resolved = {**c, "model_config": model.to_dict(),
                "batch_plan": dataclasses.asdict(plan), "devices": jax.device_count(),
                "processes": jax.process_count(), "mesh_shape": dict(mesh.shape),
                "params": model.param_count()}
    return Experiment(model=model, model_class=_model_class(model), mesh=mesh, plan=plan,
                      optim=optim, train=train, data=data, eval_split=d["eval_split"],
                      ckpt=ckpt, resolved=resolved, tokenizer=tokenizer,
                      tokenizer_path=tok_path)


def _check_splits(data: DataConfig, eval_split: str) -> None:
    """Read the first example of the train and eval splits now: a wrong split name or text_field
    would otherwise surface at the first batch, or at the first evaluation hours in."""
    from jaxlm.data.sources import SplitError, first_text

    for key, split in (("split", data.split), ("eval_split", eval_split)):
        try:
            first_text(data.source, data.data_dir, split, data.read_options())
        except KeyError as e:  # the field: message from sources.text_field_of
            raise ValueError(f"config.data.text_field={data.text_field!r}: {e.args[0]}") from None
        except SplitError as e:
            raise ValueError(f"config.data.{key}={split!r}: {e}") from None
        except ValueError as e:  # the source itself (no documents, not array_record, ...)
            raise ValueError(f"config.data.source={data.source!r}: {e}") from None


def _model_class(cfg: ModelConfig) -> type:
    return Transformer


def _tokenizer(c: dict, workdir: epath.Path, seed: int):
    """The experiment's tokenizer: given, found in the workdir, or trained on the data source.
    Either may be in a bucket: SentencePiece trains and loads local files, copied up / down."""
    source = c["data"]["source"]
    if source == "synthetic":
        return None, None
    from jaxlm.tokenizer import Tokenizer, train_tokenizer

    t = c["tokenizer"]
    path = as_path(t["path"]) if t["path"] else workdir / "tokenizer" / "tokenizer.model"
    if not path.is_file():
        trainable = source == "stdlib" or source.startswith("local:")
        if not (t["train_if_missing"] and not t["path"] and trainable):
            raise FileNotFoundError(
                f"config.tokenizer.path: {path} does not exist; point it at a SentencePiece .model"
                + ("" if trainable else f" (a tokenizer is only trained on stdlib / local: text, "
                   f"not on {source})"))
        corpus = "stdlib" if source == "stdlib" else source[len("local:"):]
        if jax.process_index() == 0:
            log.info("training a %d-piece tokenizer on %s -> %s", t["vocab_size"], corpus, path.parent)
        if not is_remote(path):
            path = as_path(train_tokenizer(corpus, path.parent, vocab_size=t["vocab_size"], seed=seed))
        else:
            local = train_tokenizer(corpus, tempfile.mkdtemp(prefix="jaxlm-tokenizer-"),
                                    vocab_size=t["vocab_size"], seed=seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            for f in local.parent.iterdir():  # tokenizer.model and tokenizer.json
                as_path(f).copy(path.parent / f.name, overwrite=True)
    tokenizer = Tokenizer(local_copy(path))
    trains_its_own = not t["path"] and t["train_if_missing"] and (
        source == "stdlib" or source.startswith("local:"))
    if trains_its_own and tokenizer.vocab_size != t["vocab_size"]:
        # The run's own tokenizer, trained earlier with another size: its checkpoints and data
        # positions belong to it, so a changed vocab_size cannot silently be ignored.
        raise ValueError(f"config.tokenizer.vocab_size={t['vocab_size']}, but {path} (this "
                         f"workdir's tokenizer) has {tokenizer.vocab_size} pieces: restore the "
                         "value, or use a new --workdir to train a new tokenizer")
    return tokenizer, path
