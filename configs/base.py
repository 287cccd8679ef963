"""Shared defaults for every attnres_jax run; named configs override fields of it.

The default trains a 0.9M-parameter Block AttnRes model on the standard library's
source bytes: under 3 minutes on a 2-core CPU, validation loss 2.35 -> 1.64.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration (a small byte-level model)."""
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  model.vocab_size = 256  # tokens; 0 = the data's (metadata.json); 256 for the stdlib bytes
  model.num_layers = 4  # transformer layers L_b; AttnRes sublayers L = 2 * L_b
  model.d_model = 128  # residual width d
  model.num_heads = 4  # query heads; must divide d_model unless head_dim is set
  model.head_dim = 0  # channels per attention head; 0 = d_model / num_heads
  model.num_kv_heads = 4  # key/value heads; must divide num_heads (< num_heads: GQA)
  model.d_ff = 384  # SwiGLU hidden width
  model.rope_theta = 10_000.0  # RoPE base frequency
  model.tie_embeddings = False  # LM head shares the token-embedding matrix
  model.residual = "block"  # depth mixing: prenorm | full | block | mhc (hyper-connections baseline)
  model.block_size = 2  # Block AttnRes block size S, in sublayers, 1 <= S <= 2 * num_layers
  model.key_norm_gain = True  # learnable gain in each key RMSNorm (docs/method.md §2, §12.2)
  model.norm_eps = 1e-6  # epsilon of every RMSNorm, key norms included
  model.init_std = 0.02  # std of weight init; output projections get init_std / sqrt(2 * num_layers)
  model.embed_init_std = 1.0  # std of the token-embedding init (source b_0 of AttnRes)
  model.dtype = "float32"  # activation dtype: float32 | bfloat16 (depth softmax always >= float32)
  model.param_dtype = "float32"  # parameter storage dtype: float32 | bfloat16
  model.remat = "full"  # activation rematerialisation: none | full | save_dots
  # Depth attention over sealed blocks: xla (jnp reference) | pallas (TPU/GPU kernel) | pallas_interpret (CPU)
  model.depth_attention_impl = "xla"
  # Token attention: xla (dense T x T scores) | splash (TPU flash kernel) | splash_interpret (CPU) |
  # cudnn (GPU flash) | auto (splash on TPU, cudnn on GPU, xla on CPU); model/attention_kernels.py
  model.attention_impl = "xla"
  model.unroll_layers = False  # unroll every layer and loss-chunk loop (AOT cost estimates; compiles slowly)
  # AttnRes: scan the layers in this many runs, each reading only the slots it can see (docs/method.md §7)
  model.depth_scan_segments = 1
  # AttnRes: answer all queries of a block at its start, then merge each partial sum (docs/method.md §6)
  model.two_phase = False
  # Ablations of the depth-mixing rule (docs/method.md §8; residuals/mixing_rules.py); any change runs in jnp.
  model.depth_key_norm = True  # RMSNorm on the keys; False: k_i = v_i
  model.depth_normalization = "softmax"  # softmax | sigmoid (not normalised) | none (raw weights, DenseFormer)
  model.depth_heads = 1  # separate depth softmax per channel group of d_model / depth_heads
  model.depth_window = 0  # Full AttnRes: attend to the last depth_window outputs + the embedding; 0 = all
  model.depth_logits = "content"  # content: w_l . RMSNorm(v_i) | learned: one scalar per (sublayer, source)
  model.depth_query_projection = False  # input-dependent query q_l = w_l + W_l h (h: the newest source)
  model.depth_query_norm = False  # with the projection: q_l = w_l + W_l RMSNorm(h), our variant (docs/method.md §12.4)
  # mHC (residual=mhc; residuals/hyper_connections.py): m residual streams, doubly stochastic stream mixing.
  model.mhc_streams = 4  # m >= 2
  model.mhc_residual_mixing = "sinkhorn"  # sinkhorn (Sinkhorn-Knopp) | permutations (mHC-lite, m <= 5)
  model.mhc_sinkhorn_iters = 20  # Sinkhorn-Knopp iterations
  # FFN sublayer of every layer: swiglu (dense, width d_ff) | moe (Mixture-of-Experts, each expert d_ff wide)
  model.ffn = "swiglu"
  # MoE (ffn=moe; model/moe.py, docs/method.md §16). Defaults: a small DeepSeek-style layer.
  model.moe = moe = ml_collections.ConfigDict()
  moe.num_experts = 8  # routed experts E
  moe.top_k = 2  # routed experts per token
  moe.num_shared_experts = 1  # always-on experts per layer
  moe.score_function = "softmax"  # router scores: softmax | sigmoid (DeepSeek-V3)
  moe.normalize_top_k = True  # gate weights divided by their sum over the token's top-k
  moe.routed_scaling_factor = 1.0  # multiplies the routed experts' gate weights
  moe.capacity_factor = 0.0  # per expert and sequence ceil(factor * T * top_k / E) slots, the rest dropped; 0: none
  moe.impl = "auto"  # grouped matmul: ragged_dot | megablox (TPU) | megablox_interpret (CPU) | auto (by platform)
  moe.dense_layers = 0  # the first layers keep a dense SwiGLU FFN (DeepSeek / Moonlight)
  moe.dense_d_ff = 0  # SwiGLU width of those dense layers; 0 = d_ff
  moe.aux_loss_coef = 1e-3  # weight of the Switch load-balancing loss E sum_e f_e P_e, per MoE layer
  moe.z_loss_coef = 0.0  # weight of the router z-loss mean(logsumexp(logits)^2), per MoE layer
  moe.bias_update_rate = 1e-3  # auxiliary-loss-free balancing: selection-bias step per train step; 0 = off

  config.data = data = ml_collections.ConfigDict()
  data.source = "stdlib"  # stdlib (this interpreter's standard library, bytes) | token_files
  data.path = ""  # token-files directory (source=token_files), see attnres_jax/data/token_files.py
  data.cache_dir = ""  # where the stdlib corpus is tokenised once; "" = ~/.cache/attnres_jax
  data.tokenizer = "bytes"  # stdlib corpus: bytes (vocab 256) | bpe (trained on its train split, cached)
  data.bpe_vocab_size = 4096  # stdlib corpus, tokenizer=bpe: ids of the BPE (set model.vocab_size to 0 or this)
  data.val_fraction = 0.02  # share of files (by path hash) in the validation split
  data.seq_len = 128  # tokens per training window (the model sees seq_len, predicts seq_len)
  data.global_batch_size = 16  # sequences per optimiser step, over all processes
  data.seed = 0  # window shuffling seed
  # stop token attention across end-of-document tokens inside a window (segment ids); docs/method.md §14
  data.document_masking = False

  config.optim = optim = ml_collections.ConfigDict()
  optim.name = "adamw"  # adamw | muon (Muon on per-layer matrices, AdamW on the rest; docs/method.md §15)
  optim.peak_lr = 3e-3  # learning rate after warmup
  optim.schedule = "cosine"  # cosine (warmup + cosine) | wsd (warmup-stable-decay)
  optim.warmup_steps = 50  # linear warmup from 0
  optim.min_lr_ratio = 0.1  # final learning rate / peak_lr
  optim.wsd_decay_fraction = 0.2  # wsd: share of steps in the final linear decay
  optim.b1 = 0.9  # AdamW beta1
  optim.b2 = 0.95  # AdamW beta2
  optim.eps = 1e-8  # AdamW epsilon
  optim.weight_decay = 0.1  # decoupled; never on norms, pseudo-queries, key gains
  optim.decay_embeddings = False  # also decay the token embedding (and untied head)
  optim.grad_clip_norm = 1.0  # global-norm clipping; 0 = off
  optim.grad_accum_steps = 1  # micro-batches per step; must divide the per-process batch
  optim.muon_momentum = 0.95  # muon: Nesterov momentum of the matrices' gradients, in [0, 1)
  optim.muon_ns_steps = 5  # muon: Newton-Schulz iterations orthogonalising each update (>= 1)
  optim.muon_match_adamw_rms = True  # muon: scale updates to AdamW's RMS (0.2), so peak_lr carries over

  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 600  # optimiser steps
  train.seed = 0  # parameter init seed
  train.log_every = 10  # steps between progress/metrics lines
  train.dynamics_every = 100  # steps between training-dynamics records (dynamics.jsonl, TensorBoard); 0 = off
  train.eval_every = 100  # steps between validation passes (and one at the end)
  train.eval_batches = 8  # validation batches per pass (fixed windows)
  train.checkpoint_every = 100  # steps between checkpoints (and one at the end)
  train.max_to_keep = 3  # checkpoints kept
  # Resuming with another config is refused (train/resume.py), except for these dotted fields, comma-separated
  train.resume_accept_changes = ""
  train.async_checkpointing = True  # write checkpoints in the background
  train.loss_chunk_size = 0  # tokens per cross-entropy chunk (logits never built whole; recomputed); 0 = one chunk
  train.profile_steps = ""  # "first:last" steps traced by jax.profiler into <workdir>/profile; "" = off

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # data-parallel devices; -1 = all devices the other axes leave
  mesh.fsdp = 1  # devices sharding parameters, optimiser state (over embed) and the batch
  mesh.expert = 1  # devices sharding MoE experts (expert parallelism) and the batch; must divide num_experts
  mesh.tensor = 1  # devices sharding heads, MLP hidden and vocab (tensor parallelism)
  # Logical axis -> mesh axes (attnres_jax/axes.py names), applied in order; unlisted axes are replicated.
  # The last line are fallbacks: where d_model does not divide by fsdp, weights shard another dimension.
  mesh.rules = (
      ("batch", ("data", "fsdp", "expert")), ("expert", "expert"), ("embed", "fsdp"), ("vocab", "tensor"),
      ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("activation_heads", "tensor"),
      ("activation_mlp", "tensor"), ("activation_vocab", "tensor"),
      ("mlp", "fsdp"), ("vocab", "fsdp"), ("kv", "fsdp"))

  config.distributed = distributed = ml_collections.ConfigDict()
  distributed.initialize = False  # call jax.distributed.initialize() first (multi-host runs)
  distributed.coordinator_address = ""  # host:port of process 0; "" = from the environment (TPU, SLURM)
  distributed.num_processes = 0  # 0 = from the environment
  distributed.process_id = -1  # -1 = from the environment
  return config
