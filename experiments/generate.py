"""Generate text from a jaxlm model directory (written by the trainer or by `import-hf`).

    python experiments/generate.py --checkpoint ckpt/ --prompt "The capital of France is"
    python experiments/generate.py --checkpoint ckpt/ --chat --system "Answer briefly."
    python experiments/generate.py --checkpoint ckpt/ --prompt_ids 1,2,3 --max_new_tokens 8 \\
        --temperature 0 --json          # prints {"ids": [...]}: the generated ids only

The tokenizer is DIR/tokenizer.model unless --tokenizer is given. --prompt_ids works without one,
but uses it when present: generation stops at its eos and never samples padded-vocab ids.
Sliding-window models decode with Mistral's rolling-buffer cache; long prompts are prefilled in
chunks of --prefill_chunk tokens (default: the window).

On a CPU, one prompt at a time (batch 1) decodes through jaxlm's matrix-vector kernel, built on
first use with the system c++ (jaxlm/kernels/matvec.py; JAXLM_CPU_MATVEC=0 turns it off, =1 makes
a failed build an error). JAXLM_HOST_MALLOC=1 keeps freed host memory (jaxlm/hostmem.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="jaxlm model directory (config.json + params/)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="text to continue (encoded with BOS)")
    mode.add_argument("--prompt_ids", help="comma-separated token ids to continue, e.g. 1,2,3")
    mode.add_argument("--chat", action="store_true", help="multi-turn Llama-2 chat in the terminal")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: CHECKPOINT/tokenizer.model)")
    p.add_argument("--max_new_tokens", type=int, default=128,
                   help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default for --prompt/--prompt_ids; 0.6 for --chat, Llama-2)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus mass (default 1.0; 0.9 for --chat)")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same output)")
    p.add_argument("--prefill_chunk", type=int, default=None,
                   help="prompt tokens per prefill step (default: the sliding window W if the "
                        "prompt is longer, else the whole prompt)")
    p.add_argument("--json", action="store_true", help='print one JSON object {"ids": [...], ...}')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxlm.hostmem import keep_freed_memory_for_cli

    keep_freed_memory_for_cli(by_default=False)  # JAXLM_HOST_MALLOC=1: see jaxlm.hostmem
    try:
        from jaxlm.kernels.matvec import mode

        mode()  # a bad JAXLM_CPU_MATVEC is one error line before the checkpoint loads
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or generating: no traceback
        print("\ninterrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


def load(args):
    from jaxlm.checkpoint import load_model
    from jaxlm.paths import as_path, local_copy
    from jaxlm.tokenizer import Tokenizer

    print(f"loading {args.checkpoint}…", file=sys.stderr, flush=True)
    model = load_model(args.checkpoint)
    tok_path = as_path(args.tokenizer or as_path(args.checkpoint) / "tokenizer.model")
    if not tok_path.is_file():
        if args.tokenizer or args.prompt_ids is None:
            raise FileNotFoundError(f"{tok_path}: no tokenizer; pass --tokenizer PATH "
                                    "(or use --prompt_ids)")
        return model, None  # --prompt_ids without any tokenizer: no eos, whole vocab
    # Loaded for --prompt_ids too: it gives eos and the vocab limit (padded-vocab ids never sampled).
    return model, Tokenizer(local_copy(tok_path))  # SentencePiece reads local files only


def check_args(args) -> None:
    """Flag errors naming the flag, before the checkpoint is read or anything compiles."""
    t = args.temperature
    if t is not None and not (math.isfinite(t) and t >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {t}")
    greedy = t == 0 or (t is None and not args.chat)
    if greedy and (args.top_k is not None or args.top_p is not None):
        raise ValueError("--top_k/--top_p shape sampling, but decoding is greedy (--temperature "
                         f"{0 if t is None else t}); set --temperature > 0 to sample")
    for flag, value in (("--max_new_tokens", args.max_new_tokens),
                        ("--prefill_chunk", args.prefill_chunk)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")


def run(args) -> int:
    from jaxlm.inference.generate import generate
    from jaxlm.inference.sampling import SamplingConfig

    check_args(args)
    model, tok = load(args)
    chat = args.chat
    sampling = SamplingConfig(
        temperature=args.temperature if args.temperature is not None else (0.6 if chat else 0.0),
        top_p=args.top_p if args.top_p is not None else (0.9 if chat else 1.0),
        top_k=args.top_k or 0, vocab_limit=tok.vocab_size if tok else None)
    eos = tok.eos_id if tok else None

    notice = ["compiling and generating…"]  # the first call compiles for a while: say so, once

    def complete(ids):
        if notice:
            print(notice.pop(), file=sys.stderr, flush=True)
        start = time.perf_counter()
        out = generate(model, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling,
                       seed=args.seed, eos_id=eos, prefill_chunk=args.prefill_chunk)
        return out.tokens[0], out.finished[0], time.perf_counter() - start

    if chat:
        # Full-attention models hold prompt + answer in max_seq_len positions (generate checks
        # it); sliding-window ones decode any length in their rolling buffer.
        cfg = model.cfg
        budget = None if cfg.sliding_window is not None else cfg.max_seq_len - args.max_new_tokens
        return chat_loop(tok, complete, args.system, budget)
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--prompt_ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    else:
        ids = tok.encode(args.prompt, bos=True)
    new, _, seconds = complete(ids)
    # Decode prompt and continuation together: SentencePiece drops the leading space of the first
    # piece of whatever it decodes, so decode(new) alone would glue "is" + "Paris" into "isParis".
    if args.json:
        record = {"ids": new}
        if tok:
            record["text"] = tok.decode(ids + new)[len(tok.decode(ids)):]
        print(json.dumps(record))
    else:
        print(tok.decode(ids + new) if tok else new)
        print(f"[{len(new)} tokens in {seconds:.2f}s incl. compilation]", file=sys.stderr)
    return 0


def chat_loop(tok, complete, system, budget: int | None) -> int:
    """Read user lines from stdin until an empty line or EOF; `budget`: prompt tokens that fit."""
    from jaxlm.chat import fit_dialog_prompt

    dialog = [{"role": "system", "content": system}] if system else []
    print("Llama-2 chat. Empty line, Ctrl-D or Ctrl-C to quit.", file=sys.stderr)
    while True:
        try:
            user = input("you> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: quit
            print(file=sys.stderr)
            break
        if not user.strip():
            break
        try:
            ids, kept = fit_dialog_prompt(tok, dialog + [{"role": "user", "content": user}], budget)
            new, finished, seconds = complete(ids)
        except ValueError as e:  # a control tag typed by the user, or one message too long
            print(f"error: {e}", file=sys.stderr)
            continue
        dropped = (len(dialog) + 1 - len(kept)) // 2
        if dropped:
            print(f"[context full: dropped the oldest {dropped} exchange(s) to fit max_seq_len "
                  f"with --max_new_tokens]", file=sys.stderr)
        answer = tok.decode(new).strip()
        print(f"assistant> {answer}")
        if not finished:
            print("[truncated at --max_new_tokens]", file=sys.stderr)
        dialog = kept + [{"role": "assistant", "content": answer}]
    return 0


if __name__ == "__main__":
    sys.exit(main())
