"""Pretrain a jaxlm model (Llama 2 §2.2 recipe) on a CPU, a TPU VM or a pod slice.

    python experiments/pretrain.py --workdir runs/tiny --config=experiments/configs/pretrain.py:tiny
    python experiments/pretrain.py --workdir runs/tiny --config=experiments/configs/pretrain.py:tiny \
        --config.train.steps=200 --config.checkpoint.every_steps=50

Running the same command again resumes from the latest checkpoint in WORKDIR/checkpoints.
SIGTERM (preemption) saves a checkpoint and exits 0. Outputs in WORKDIR: metrics.jsonl,
tensorboard/, loss.png, config.json, checkpoints/, model/ (for experiments/generate.py).
WORKDIR is a local directory or a bucket, gs://BUCKET/RUN (on a TPU pod, shared by all hosts).
"""
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the final model: "
                    "local or gs://BUCKET/RUN", required=True)
config_flags.DEFINE_config_file("config", None, "experiment config file and preset, e.g. "
                                "experiments/configs/pretrain.py:tiny", lock_config=True)


def main(argv):
    del argv
    from jaxlm.hostmem import keep_freed_memory_for_cli

    # First, before anything starts threads. Off unless JAXLM_HOST_MALLOC=1: XLA:CPU's per-step
    # buffers stop page-faulting (+13-15 % on the bench step) for ~2x the resident memory.
    keep_freed_memory_for_cli(by_default=False)
    from jaxlm.train.experiment import maybe_initialize_distributed

    maybe_initialize_distributed()
    import jax

    from jaxlm.train.trainer import NonFiniteError, train

    logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    if FLAGS.config is None:
        print("error: --config is required, e.g. --config=experiments/configs/pretrain.py:tiny",
              file=sys.stderr)
        return 2
    try:
        summary = train(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, NonFiniteError) else 3
    if jax.process_index() == 0:
        print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    if s.get("preempted"):
        print(f"preempted at step {s['steps']}: checkpoint saved in {s['workdir']}/checkpoints; "
              "run the same command to resume")
        return
    print(f"\ndone: {s['steps']} steps, final loss {s.get('loss')}, eval loss {s.get('eval_loss')}"
          f", skipped non-finite steps {s.get('bad_steps_total', 0)}")
    if s.get("unigram_entropy") is not None:
        print(f"unigram entropy of the held-out tokens: {s['unigram_entropy']:.3f} nats "
              "(the loss of a model that knows only token frequencies)")
    if s.get("sample"):
        print(f"sample (greedy): {s['sample']!r}")
    for key, what in (("model_dir", "model (for experiments/generate.py)"),
                      ("tensorboard", "TensorBoard logs"), ("loss_plot", "loss curve")):
        if s.get(key):
            print(f"{what}: {s[key]}")
    print(f"metrics: {s['workdir']}/metrics.jsonl")


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
