"""A gs:// workdir stays a bucket URL end to end (pathlib made it /cwd/gs:/bucket/run), and
jax.distributed is initialized on exactly the multi-process clusters JAX itself detects.

No bucket is reachable here, so `fake_gcs` serves gs:// from a local directory at the two doors
a real run goes through: fsspec's "gcs" protocol (what etils.epath uses for every jaxlm file
operation: mkdir, open, exists, iterdir, copy, rmtree), made as strict as GCS (no append), and
orbax (whose own GCS path needs tensorstore's GCS driver: the paths handed to it are recorded
and must be gs:// epath.Paths, then redirected to the same directory).
"""
import importlib
import importlib.util
import json
import os

import pytest
from etils import epath

from jaxlm.paths import as_path, is_remote, local_copy

BUCKET = "gs://fake-bucket"
CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs", "pretrain.py")


def test_as_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    p = as_path("gs://b/run")
    assert isinstance(p, epath.Path) and str(p) == "gs://b/run" and is_remote(p)
    assert str(p / "checkpoints") == "gs://b/run/checkpoints" and str(p.parent) == "gs://b"
    monkeypatch.chdir(tmp_path)
    local = as_path("runs/x")
    assert str(local) == str(tmp_path / "runs" / "x") and not is_remote(local)
    assert as_path(tmp_path) == as_path(str(tmp_path)) and as_path(local) == local


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs://BUCKET/... is tmp_path/bucket/...; returns (root, paths handed to orbax)."""
    from fsspec.implementations.local import LocalFileSystem
    from etils.epath import backend
    import orbax.checkpoint as ocp

    root = tmp_path / "gcs"
    root.mkdir()

    def local(path):
        s = os.fspath(path)
        return f"{root}/{s.split('://', 1)[1]}" if s.startswith(("gs://", "gcs://")) else s

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, auto_mkdir=True, **kwargs)  # GCS has no directories

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(local(path))

        def _open(self, path, mode="rb", **kwargs):
            if "a" in mode:  # gcsfs silently truncates instead: either way, history is lost
                raise NotImplementedError("GCS objects cannot be appended to")
            return super()._open(path, mode, **kwargs)

    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "gcs", FakeGCS)
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()

    handed = []

    def to_orbax(path):
        handed.append(path)
        assert isinstance(path, epath.Path) and str(path).startswith(BUCKET + "/"), repr(path)
        return epath.Path(local(path))

    class CheckpointManager(ocp.CheckpointManager):
        def __init__(self, directory, *args, **kwargs):
            super().__init__(to_orbax(directory), *args, **kwargs)

    class StandardCheckpointer(ocp.StandardCheckpointer):
        def save(self, directory, *args, **kwargs):
            return super().save(to_orbax(directory), *args, **kwargs)

        def restore(self, directory, *args, **kwargs):
            return super().restore(to_orbax(directory), *args, **kwargs)

        def metadata(self, directory, *args, **kwargs):
            return super().metadata(to_orbax(directory), *args, **kwargs)

    monkeypatch.setattr(ocp, "CheckpointManager", CheckpointManager)
    monkeypatch.setattr(ocp, "StandardCheckpointer", StandardCheckpointer)
    monkeypatch.chdir(tmp_path)  # where pathlib used to put "gs:/fake-bucket/..."
    yield root, handed
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    assert not (tmp_path / "gs:").exists(), "a gs:// path was turned into a local one"


def _config(steps):
    spec = importlib.util.spec_from_file_location("pretrain_cfg", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("test")
    config.train.steps = steps
    return config


def test_training_in_a_bucket_writes_there_and_resumes(fake_gcs, monkeypatch):
    from jaxlm.checkpoint import load_model, read_model_config
    from jaxlm.train import trainer
    from jaxlm.train.metrics import read_metrics
    from jaxlm.train.trainer import train

    monkeypatch.setattr(trainer, "peak_flops_per_device", lambda: (1e12, "test"))  # -5 s a run
    root, handed = fake_gcs
    workdir = f"{BUCKET}/run"
    bucket = root / "fake-bucket" / "run"

    summary = train(_config(3), workdir)
    assert summary["completed"] and summary["workdir"] == workdir
    assert summary["model_dir"] == f"{workdir}/model"
    assert summary["loss_plot"] == f"{workdir}/loss.png"
    assert [r["step"] for r in read_metrics(f"{workdir}/metrics.jsonl") if "loss" in r] == [1, 2, 3]
    for name in ("config.json", "loss.png", "model/config.json", "checkpoints/3"):
        assert (bucket / name).exists(), name
    assert any((bucket / "model" / "params").iterdir())
    assert any(f.name.startswith("events.out.tfevents") for f in (bucket / "tensorboard").iterdir())
    assert {str(p) for p in handed} >= {f"{workdir}/checkpoints", f"{workdir}/model/params"}

    # Run again (as after a preemption): resumes from the bucket's checkpoint, which here is the
    # last step, so nothing retrains; metrics history kept, model/ replaced.
    summary = train(_config(3), workdir)
    assert summary["completed"] and summary["start_step"] == 3 and summary["steps"] == 3
    assert [r["step"] for r in read_metrics(f"{workdir}/metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert len(list((bucket / "tensorboard").iterdir())) == 2  # one event file per run

    # The model directory in the bucket is read back from its URL.
    assert read_model_config(f"{workdir}/model").vocab_size > 0
    model = load_model(f"{workdir}/model")
    assert json.loads((bucket / "model" / "config.json").read_text())["model"] == model.cfg.to_dict()


def test_metrics_in_a_bucket_are_uploaded_as_they_come_and_kept_on_resume(fake_gcs):
    from jaxlm.train.metrics import MetricsWriter, read_metrics

    root, _ = fake_gcs
    in_bucket = root / "fake-bucket" / "m" / "metrics.jsonl"
    writer = MetricsWriter(f"{BUCKET}/m", sync_every_s=0)  # upload after every write
    writer.write(1, {"loss": 2.5})
    assert json.loads(in_bucket.read_text()) == {"step": 1, "loss": 2.5}
    writer.close()
    writer = MetricsWriter(f"{BUCKET}/m")  # a resumed run: uploads at close only
    writer.write(2, {"loss": 2.0})
    assert len(in_bucket.read_text().splitlines()) == 1
    writer.close()
    assert read_metrics(f"{BUCKET}/m/metrics.jsonl") == [{"step": 1, "loss": 2.5},
                                                         {"step": 2, "loss": 2.0}]


def test_local_copy_downloads_from_a_bucket(fake_gcs):
    as_path(f"{BUCKET}/t/tokenizer.model").write_bytes(b"spm")
    copy = local_copy(f"{BUCKET}/t/tokenizer.model")
    assert copy.read_bytes() == b"spm" and not is_remote(copy) and copy.name == "tokenizer.model"


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None or
                    importlib.util.find_spec("tensorflow") is not None,
                    reason="a gs:// backend is installed here")
def test_bucket_workdir_without_gcsfs_is_one_clear_error():
    from jaxlm.train.trainer import train

    with pytest.raises(ValueError, match=r"--workdir gs://b/run: .*gcsfs.*\[tpu\]"):
        train(_config(3), "gs://b/run")


def test_export_hf_names_a_bucket_path(tmp_path):
    from jaxlm.convert.export import export_hf

    with pytest.raises(ValueError, match="--src gs://b/run/model: export-hf reads and writes local"):
        export_hf("gs://b/run/model", tmp_path / "hf")
    with pytest.raises(ValueError, match="--dst gs://b/hf"):
        export_hf(tmp_path / "model", "gs://b/hf")


# ------------------------------------------------------------------ jax.distributed detection


@pytest.fixture
def dist(monkeypatch):
    """A CPU machine outside any cluster; returns the list of initialize() calls."""
    import jax
    from jax._src.clusters import cloud_tpu_cluster

    for var in ("JAXLM_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_JOB_ID",
                "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))

    def no_metadata_server(key):
        raise AssertionError(f"metadata server asked for {key} off a Cloud TPU VM")

    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", no_metadata_server)
    return calls


def _tpu_vm(monkeypatch, metadata: dict | None = None):
    """Pretend to be a Cloud TPU VM (libtpu and chips found at import) with this metadata."""
    from jax._src.clusters import cloud_tpu_cluster

    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)  # jax sets it where there is no TPU
    if metadata is not None:
        monkeypatch.setattr(cloud_tpu_cluster, "get_metadata",
                            lambda key: (metadata[key], 200) if key in metadata else ("", 404))


def test_distributed_is_a_no_op_on_cpu(dist, caplog):
    from jaxlm.train.experiment import maybe_initialize_distributed

    assert maybe_initialize_distributed() is False and dist == []
    assert "detection failed" not in caplog.text  # e.g. the metadata server asked off a TPU VM


def test_distributed_on_a_multi_host_gce_tpu_vm_without_env_vars(dist, monkeypatch):
    from jaxlm.train.experiment import maybe_initialize_distributed

    _tpu_vm(monkeypatch, {"agent-worker-number": "1",
                          "worker-network-endpoints": "w-0:0:10.0.0.2,w-1:1:10.0.0.3"})
    assert maybe_initialize_distributed() is True and len(dist) == 1


def test_distributed_skipped_on_a_single_host_tpu_vm(dist, monkeypatch):
    from jaxlm.train.experiment import maybe_initialize_distributed

    _tpu_vm(monkeypatch, {"agent-worker-number": "0", "worker-network-endpoints": "w-0:0:10.0.0.2"})
    assert maybe_initialize_distributed() is False and dist == []


def test_distributed_on_gke_from_worker_hostnames(dist, monkeypatch):
    from jaxlm.train.experiment import maybe_initialize_distributed

    _tpu_vm(monkeypatch, {})
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0")
    assert maybe_initialize_distributed() is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert maybe_initialize_distributed() is True and len(dist) == 1


def test_distributed_env_vars_and_override(dist, monkeypatch):
    from jaxlm.train.experiment import maybe_initialize_distributed

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:8482")  # tpu_scripts/remote/env.sh
    assert maybe_initialize_distributed() is True
    monkeypatch.setenv("JAXLM_DISTRIBUTED", "0")
    assert maybe_initialize_distributed() is False
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("JAXLM_DISTRIBUTED", "1")
    assert maybe_initialize_distributed() is True and len(dist) == 2


def test_distributed_detection_failure_is_a_warning(dist, monkeypatch, caplog):
    from jax._src.clusters import cloud_tpu_cluster
    from jaxlm.train.experiment import maybe_initialize_distributed

    _tpu_vm(monkeypatch)

    def unreachable(key):
        raise ConnectionError("metadata.google.internal unreachable")

    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", unreachable)
    assert maybe_initialize_distributed() is False and dist == []
    assert "JAXLM_DISTRIBUTED=1" in caplog.text


def test_tokenizer_trained_into_a_bucket_and_found_there(fake_gcs, tmp_path):
    from jaxlm.train.experiment import _tokenizer

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # line {i}\n"
                            for i in range(400)))
    c = {"data": {"source": f"local:{text}"},
         "tokenizer": {"path": "", "train_if_missing": True, "vocab_size": 320}}
    workdir = as_path(f"{BUCKET}/tok")
    tokenizer, path = _tokenizer(c, workdir, seed=0)
    assert str(path) == f"{BUCKET}/tok/tokenizer/tokenizer.model" and tokenizer.vocab_size == 320
    bucket = fake_gcs[0] / "fake-bucket" / "tok" / "tokenizer"
    assert sorted(p.name for p in bucket.iterdir()) == ["tokenizer.json", "tokenizer.model"]
    again, path2 = _tokenizer(c, workdir, seed=0)  # a resumed run loads it from the bucket
    assert path2 == path and again.encode("def f(x):") == tokenizer.encode("def f(x):")
