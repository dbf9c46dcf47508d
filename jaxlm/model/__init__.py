"""jaxlm model code.

Dimension letters, used in every einsum string, shape comment and sharding name:

    B batch            T query length      S key/value length
    D model width      N query heads       K kv heads
    G query heads per kv head (N = K * G)  H head dim
    F MLP hidden       E experts           C expert capacity
    R experts chosen per token (top-k)     V vocabulary       L layers
    M rows of token-expert assignments sorted by expert (dropless MoE), or a chunk of them

Logical axis names carried by parameters and activations (mapped to mesh axes by the one table in
`jaxlm.sharding`): layers, vocab, embed, heads, kv_heads, head_dim, mlp, norm, expert,
activation_batch, activation_length, activation_embed, activation_heads, activation_kv_heads,
activation_mlp, activation_vocab.
"""

from jaxlm.model.transformer import Transformer

__all__ = ["Transformer"]
