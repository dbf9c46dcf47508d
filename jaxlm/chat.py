"""The Llama-2 chat format, token for token as Meta's `chat_completion` (llama/generation.py).

SPEC §2. A dialog is a list of {"role": "system" | "user" | "assistant", "content": str}:
an optional leading system message, then user/assistant turns alternating, starting with user.

    [bos] [INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user_1} [/INST] {answer_1} [eos]
    [bos] [INST] {user_2} [/INST] {answer_2} [eos]
    [bos] [INST] {user_3} [/INST]                    <- an open last user turn: the prompt

Each pair is tokenised as one string, exactly as Meta does; tokenising the prompt and the answer
separately could give different ids. The loss mask (1 = train on this token) covers the answer
tokens and their eos only: everything the system or user wrote, [INST] ... [/INST] included,
is 0 (Llama 2 §3.1: "we zero-out the loss on tokens from the user prompt"). SFT, Ghost
Attention and RLHF build on `encode_dialog_turns` / `encode_dialog`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from jaxlm.tokenizer import Tokenizer

# Meta llama/generation.py. The tags are plain text, not special pieces (SPEC §2).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."  # Meta's wording

Message = Mapping[str, str]


def encode_dialog(tokenizer: Tokenizer, dialog: Sequence[Message]) -> tuple[list[int], list[int]]:
    """Token ids of a dialog in the Llama-2 chat format and its loss mask.

    Args:
      dialog: [system?] user, assistant, user, assistant, ... [user]; a final user turn becomes the
        generation prompt (all mask 0).
    Returns:
      (ids, loss_mask), both of length T; loss_mask[t] = 1 on assistant answer tokens and the eos
      closing each answer, 0 elsewhere.
    Raises:
      ValueError naming the message index for wrong roles, wrong order or a tag in the content.
    """
    ids: list[int] = []
    mask: list[int] = []
    for turn_ids, turn_mask in encode_dialog_turns(tokenizer, dialog):
        ids += turn_ids
        mask += turn_mask
    return ids, mask


def encode_dialog_prompt(tokenizer: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """Prompt ids for generation (Meta's chat_completion): the dialog must end with a user turn."""
    last = _validate(dialog)[-1]["role"]
    if last != "user":
        raise ValueError(f"message {len(dialog) - 1}: a generation prompt must end with a user "
                         f"message, got {last!r}")
    return encode_dialog(tokenizer, dialog)[0]


def fit_dialog_prompt(tokenizer: Tokenizer, dialog: Sequence[Message],
                      max_tokens: int | None) -> tuple[list[int], list[Message]]:
    """Prompt ids of `dialog` in at most `max_tokens` tokens, dropping the oldest exchanges.

    Whole user/assistant pairs go, oldest first; the system message and the last user message
    stay. Returns (ids, the dialog those ids encode). max_tokens None: no limit. If the system
    message and the last user message alone are too long, the ids are longer than max_tokens
    (the caller's length check reports it).
    """
    dialog = list(dialog)
    first = 1 if dialog and dialog[0].get("role") == "system" else 0
    ids = encode_dialog_prompt(tokenizer, dialog)
    while max_tokens is not None and len(ids) > max_tokens and len(dialog) - first > 1:
        del dialog[first:first + 2]
        ids = encode_dialog_prompt(tokenizer, dialog)
    return ids, dialog


def encode_dialog_turns(tokenizer: Tokenizer,
                        dialog: Sequence[Message]) -> list[tuple[list[int], list[int]]]:
    """The (ids, loss_mask) of each turn: one per user/assistant pair, plus the open last user turn.

    Per-turn output lets Ghost Attention zero the loss of earlier turns (Llama 2 §3.3).
    """
    turns = _merge_system(_validate(dialog))
    out = []
    for k in range(0, len(turns) - 1, 2):
        out.append(_encode_pair(tokenizer, turns[k], turns[k + 1]))
    if len(turns) % 2:  # ends with a user turn: the prompt for generation, nothing to learn
        ids = tokenizer.encode(f"{B_INST} {turns[-1].strip()} {E_INST}", bos=True)
        out.append((ids, [0] * len(ids)))
    return out


def _encode_pair(tokenizer: Tokenizer, user: str, answer: str) -> tuple[list[int], list[int]]:
    """bos + encode(f"{B_INST} {user} {E_INST} {answer} ") + eos, as Meta, with its loss mask.

    The mask boundary comes from tokenising the prompt part alone and checking it is a token prefix
    of the whole: the " " before the answer starts a new "▁" piece (split_by_whitespace), so no
    piece spans the boundary. A tokenizer for which that fails gets an error, not a wrong mask.
    """
    prompt = f"{B_INST} {user.strip()} {E_INST}"
    ids = tokenizer.encode(f"{prompt} {answer.strip()} ", bos=True, eos=True)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise RuntimeError(
            f"internal error: the tokens of the prompt {prompt!r} are not a prefix of the tokens "
            f"of prompt + answer with tokenizer {tokenizer.path}; a piece spans the space before "
            f"the answer (a model trained without split_by_whitespace?), so the loss mask "
            f"boundary is undefined")
    return ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))


def _validate(dialog: Sequence[Message]) -> list[Message]:
    """Checks roles, order and content; errors name the message index in the original dialog."""
    if not dialog:
        raise ValueError("empty dialog: expected [system?], user, assistant, ..., messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got "
                             f"{type(msg).__name__}")
    start = 1 if dialog[0].get("role") == "system" else 0
    if start and len(dialog) == 1:
        raise ValueError("message 0: a system message must be followed by a user message")
    for i, msg in enumerate(dialog):
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: 'content' must be a string, got {type(content).__name__}")
        expected = "system" if i < start else ("user", "assistant")[(i - start) % 2]
        if role != expected:
            where = "after the optional system message, " if start else ""
            raise ValueError(f"message {i}: role {role!r} where {expected!r} is expected; roles "
                             f"must alternate user/assistant {where}starting with user")
        tags = [t for t in SPECIAL_TAGS if t in content]
        if tags:
            raise ValueError(f"message {i}: contains {', '.join(tags)}; {UNSAFE_ERROR}")
    return list(dialog)


def _merge_system(dialog: list[Message]) -> list[str]:
    """Message contents with a leading system message merged into the first user message.

    Meta: content = B_SYS + system + E_SYS + user; the merged text is stripped later as a whole.
    """
    contents = [m["content"] for m in dialog]
    if dialog[0]["role"] == "system":
        contents = [B_SYS + contents[0] + E_SYS + contents[1]] + contents[2:]
    return contents
