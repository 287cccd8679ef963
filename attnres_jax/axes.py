"""Logical axis names that every parameter carries from creation.

A later sharding layer maps these names onto mesh axes with logical-axis rules
(MaxText style); the model code never names a mesh axis itself.
"""

LAYERS = "layers"  # leading axis of stacked (scanned) transformer-layer parameters
VOCAB = "vocab"  # token vocabulary
EMBED = "embed"  # model width d_model of weights and activations
HEADS = "heads"  # query heads
KV_HEADS = "kv_heads"  # key/value heads (grouped-query attention)
HEAD_DIM = "kv"  # per-head channel width
MLP = "mlp"  # hidden width of the SwiGLU MLP
EXPERT = "expert"  # leading axis of the MoE experts' weights (expert parallelism)
SUBLAYER = "sublayer"  # attention / MLP sublayer of one transformer layer
DEPTH_EMBED = "depth_embed"  # channels of pseudo-queries and key gains (kept replicated)

# Activation axes (constrained inside the model; mapped by the same rules).
BATCH = "batch"
ACTIVATION_LENGTH = "activation_length"
ACTIVATION_EMBED = "activation_embed"
ACTIVATION_HEADS = "activation_heads"
ACTIVATION_MLP = "activation_mlp"
ACTIVATION_VOCAB = "activation_vocab"
