"""Config validation before anything is built: one clear ValueError naming the bad field."""

from collections.abc import Mapping
from typing import Any

import jax

from attnres_jax.data.corpus import TOKENIZERS as STDLIB_TOKENIZERS
from attnres_jax.data.sources import SOURCES
from attnres_jax.kernels.depth_attention_op import IMPLS
from attnres_jax.model.attention_kernels import IMPLS as ATTENTION_IMPLS
from attnres_jax.model.moe import check_moe_spec, spec_from_config
from attnres_jax.residuals.hyper_connections import RESIDUAL_MIXINGS
from attnres_jax.residuals.mixing_rules import LOGITS, NORMALIZATIONS, rule_from_config
from attnres_jax.residuals.remat import REMAT_POLICIES
from attnres_jax.train.optim import OPTIMIZERS, SCHEDULES

RESIDUALS = ("prenorm", "full", "block", "mhc")
FFNS = ("swiglu", "moe")
DTYPES = ("float32", "bfloat16", "float64")  # float64 needs jax_enable_x64 (gradient checks)
# Depth-attention fields, which must keep these values where there is no depth attention (prenorm, mhc).
DEPTH_DEFAULTS = {"depth_key_norm": True, "depth_normalization": "softmax", "depth_heads": 1, "depth_window": 0,
                  "depth_logits": "content", "depth_query_projection": False, "depth_query_norm": False,
                  "depth_attention_impl": "xla"}


def _fail(field: str, value: Any, requirement: str, section: str = "model"):
  raise ValueError(f"config.{section}.{field}={value!r}: {requirement}")


def _check_positive_ints(section: str, fields: Mapping[str, Any], names: tuple[str, ...]) -> None:
  for field in names:
    value = fields[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      _fail(field, value, "must be a positive integer", section)


def check_model_config(model: Mapping[str, Any], *, vocab_from_data: bool = False) -> None:
  """Raises ValueError for the first invalid field of a model config (`vocab_from_data`: vocab_size may be
  0, the data's)."""
  if not (vocab_from_data and model["vocab_size"] == 0):
    _check_positive_ints("model", model, ("vocab_size",))
  _check_positive_ints("model", model, ("num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff"))
  if model["residual"] not in RESIDUALS:
    _fail("residual", model["residual"], f"must be one of {RESIDUALS}")
  num_sublayers = 2 * model["num_layers"]
  if model["residual"] == "block":
    block_size = model["block_size"]
    if not isinstance(block_size, int) or not 1 <= block_size <= num_sublayers:
      _fail("block_size", block_size,
            f"must be an integer in [1, {num_sublayers}] (sublayers = 2 * num_layers)")
  if not isinstance(model["head_dim"], int) or model["head_dim"] < 0 or model["head_dim"] % 2:
    _fail("head_dim", model["head_dim"], "must be an even integer >= 0 (RoPE rotates channel pairs; 0 = d_model / "
          "num_heads)")
  if not model["head_dim"] and model["d_model"] % model["num_heads"]:
    _fail("d_model", model["d_model"], f"must be divisible by num_heads={model['num_heads']} (or set head_dim)")
  if not model["head_dim"] and (model["d_model"] // model["num_heads"]) % 2:
    _fail("d_model", model["d_model"], "d_model / num_heads must be even for RoPE (or set an even head_dim)")
  if model["num_heads"] % model["num_kv_heads"]:
    _fail("num_kv_heads", model["num_kv_heads"],
          f"must divide num_heads={model['num_heads']}")
  for field in ("dtype", "param_dtype"):
    if model[field] not in DTYPES:
      _fail(field, model[field], f"must be one of {DTYPES}")
  if model["remat"] not in REMAT_POLICIES:
    _fail("remat", model["remat"], f"must be one of {REMAT_POLICIES}")
  if model["depth_attention_impl"] not in IMPLS:
    _fail("depth_attention_impl", model["depth_attention_impl"], f"must be one of {IMPLS}")
  if model["attention_impl"] not in ATTENTION_IMPLS:
    _fail("attention_impl", model["attention_impl"], f"must be one of {ATTENTION_IMPLS}")
  for field in ("two_phase", "unroll_layers"):
    if not isinstance(model[field], bool):
      _fail(field, model[field], "must be True or False")
  if model["two_phase"] and model["residual"] not in ("full", "block"):
    _fail("two_phase", True, f"applies to AttnRes only (residual=full or block), not {model['residual']}")
  _check_mixing_rule(model)
  _check_hyper_connections(model)
  _check_ffn(model)
  for field in ("norm_eps", "init_std", "embed_init_std", "rope_theta"):
    if not model[field] > 0:
      _fail(field, model[field], "must be > 0")


def _check_mixing_rule(model: Mapping[str, Any]) -> None:
  if model["depth_normalization"] not in NORMALIZATIONS:
    _fail("depth_normalization", model["depth_normalization"], f"must be one of {NORMALIZATIONS}")
  _check_positive_ints("model", model, ("depth_heads", "depth_scan_segments"))
  if model["d_model"] % model["depth_heads"]:
    _fail("depth_heads", model["depth_heads"], f"must divide d_model={model['d_model']}")
  if not isinstance(model["depth_window"], int) or model["depth_window"] < 0:
    _fail("depth_window", model["depth_window"], "must be an integer >= 0 (0 = every source)")
  if model["depth_window"] and model["residual"] != "full":
    _fail("depth_window", model["depth_window"], "applies to residual=full only")
  if model["depth_logits"] not in LOGITS:
    _fail("depth_logits", model["depth_logits"], f"must be one of {LOGITS}")
  for field in ("depth_query_projection", "depth_query_norm"):
    if not isinstance(model[field], bool):
      _fail(field, model[field], "must be True or False")
  if model["depth_query_norm"] and not model["depth_query_projection"]:
    _fail("depth_query_norm", True, "normalises the input of the query projection: set depth_query_projection=True")
  learned = model["depth_logits"] == "learned"
  if model["depth_normalization"] == "none" and not learned:
    _fail("depth_normalization", "none", "raw weights (DenseFormer) need depth_logits='learned'")
  if learned and model["depth_heads"] != 1:
    _fail("depth_heads", model["depth_heads"], "learned logits have one weight per source: use depth_heads=1")
  if learned and model["depth_query_projection"]:
    _fail("depth_query_projection", True, "learned logits have no query to project: use depth_logits='content'")
  if model["residual"] in ("prenorm", "mhc"):
    for field in ("depth_key_norm", "depth_normalization", "depth_heads", "depth_window", "depth_logits",
                  "depth_query_projection", "depth_query_norm", "depth_attention_impl"):
      if model[field] != DEPTH_DEFAULTS[field]:
        _fail(field, model[field], f"has no effect with residual={model['residual']} (no depth attention); "
              f"leave it at {DEPTH_DEFAULTS[field]!r}")
  if not rule_from_config(model).fused and (model["two_phase"] or model["depth_attention_impl"] != "xla"):
    _fail("two_phase" if model["two_phase"] else "depth_attention_impl",
          model["two_phase"] if model["two_phase"] else model["depth_attention_impl"],
          "ablated depth-mixing rules run in jnp: use two_phase=False and depth_attention_impl=xla")


def _check_ffn(model: Mapping[str, Any]) -> None:
  if model["ffn"] not in FFNS:
    _fail("ffn", model["ffn"], f"must be one of {FFNS}")
  if model["ffn"] != "moe":
    return
  check_moe_spec(spec_from_config(model), prefix="config.model.moe.")
  moe = model["moe"]
  if not isinstance(moe["dense_layers"], int) or not 0 <= moe["dense_layers"] < model["num_layers"]:
    _fail("moe.dense_layers", moe["dense_layers"], f"must be an integer in [0, num_layers={model['num_layers']}) "
          "(at least one MoE layer)")
  if not isinstance(moe["dense_d_ff"], int) or moe["dense_d_ff"] < 0:
    _fail("moe.dense_d_ff", moe["dense_d_ff"], "must be an integer >= 0 (0 = d_ff)")
  for field in ("aux_loss_coef", "z_loss_coef"):
    if not moe[field] >= 0:
      _fail(f"moe.{field}", moe[field], "must be >= 0")


def _check_hyper_connections(model: Mapping[str, Any]) -> None:
  _check_positive_ints("model", model, ("mhc_streams", "mhc_sinkhorn_iters"))
  if model["mhc_streams"] < 2:
    _fail("mhc_streams", model["mhc_streams"], "must be >= 2 (one stream is PreNorm)")
  if model["mhc_residual_mixing"] not in RESIDUAL_MIXINGS:
    _fail("mhc_residual_mixing", model["mhc_residual_mixing"], f"must be one of {RESIDUAL_MIXINGS}")
  if model["mhc_residual_mixing"] == "permutations" and model["mhc_streams"] > 5:
    _fail("mhc_streams", model["mhc_streams"], "permutations (mHC-lite) mixes m! matrices: use m <= 5")


def check_platform(model: Mapping[str, Any], platform: str) -> None:
  """Kernels compile for their accelerators only; on CPU the Pallas ones run interpreted."""
  if model["depth_attention_impl"] == "pallas" and platform == "cpu":
    _fail("depth_attention_impl", "pallas", "the Pallas kernel compiles for TPU and GPU only, and this machine has "
          "only CPUs: use pallas_interpret (the same kernel, interpreted) or xla")
  needs = {"splash": "tpu", "cudnn": "gpu"}.get(model["attention_impl"])
  if needs and platform != needs:
    _fail("attention_impl", model["attention_impl"], f"runs on {needs.upper()} only and this run is on {platform}: "
          "use auto (picks by platform), xla, or splash_interpret (the TPU kernel, interpreted, on CPU)")
  if model["ffn"] == "moe" and model["moe"]["impl"] == "megablox" and platform != "tpu":
    _fail("moe.impl", "megablox", f"the megablox kernel compiles for TPU only and this run is on {platform}: use "
          "auto (picks by platform), ragged_dot, or megablox_interpret (the TPU kernel, interpreted, on CPU)")


def check_run_config(config: Mapping[str, Any], process_count: int = 1, platform: str = "cpu") -> None:
  """Checks `config.model`, `config.data`, `config.optim` and `config.train` of a training run on `platform`."""
  check_model_config(config["model"], vocab_from_data=True)
  check_platform(config["model"], platform)
  if config["model"]["ffn"] == "moe" and config["mesh"]["expert"] > 1:  # -1: checked once the mesh is made
    check_moe_spec(spec_from_config(config["model"]), expert_parallelism=config["mesh"]["expert"],
                   prefix="config.model.moe.")
  if "float64" in (config["model"]["dtype"], config["model"]["param_dtype"]) and not jax.config.jax_enable_x64:
    _fail("dtype", config["model"]["dtype"], "float64 needs JAX_ENABLE_X64=1 in the environment (else jax "
          "silently computes in float32)")
  if config["model"]["param_dtype"] == "bfloat16":
    _fail("param_dtype", config["model"]["param_dtype"], "AdamW would keep its moments and apply its updates in "
          "this dtype, where updates below 1/256 of a weight round away; train with float32 parameters (the "
          "master copy) and dtype=bfloat16 for bf16 compute")
  data, optim, train = config["data"], config["optim"], config["train"]
  if data["source"] not in SOURCES:
    _fail("source", data["source"], f"must be one of {SOURCES}", "data")
  _check_positive_ints("data", data, ("seq_len", "global_batch_size"))
  if not 0 < data["val_fraction"] < 1:
    _fail("val_fraction", data["val_fraction"], "must be in (0, 1)", "data")
  if data["tokenizer"] not in STDLIB_TOKENIZERS:
    _fail("tokenizer", data["tokenizer"], f"must be one of {STDLIB_TOKENIZERS}", "data")
  if data["tokenizer"] != "bytes" and data["source"] != "stdlib":
    _fail("tokenizer", data["tokenizer"], "applies to source=stdlib (token files bring their own tokenizer)", "data")
  if not isinstance(data["bpe_vocab_size"], int) or not 257 < data["bpe_vocab_size"]:
    _fail("bpe_vocab_size", data["bpe_vocab_size"], "must be an integer > 257 (256 byte symbols, the "
          "end-of-document token, merges)", "data")
  if not isinstance(data["document_masking"], bool):
    _fail("document_masking", data["document_masking"], "must be True or False", "data")
  _check_positive_ints("optim", optim, ("grad_accum_steps",))
  if data["global_batch_size"] % (process_count * optim["grad_accum_steps"]):
    _fail("global_batch_size", data["global_batch_size"],
          f"must be divisible by processes x config.optim.grad_accum_steps = {process_count} x "
          f"{optim['grad_accum_steps']}", "data")
  if optim["name"] not in OPTIMIZERS:
    _fail("name", optim["name"], f"must be one of {OPTIMIZERS}", "optim")
  if optim["schedule"] not in SCHEDULES:
    _fail("schedule", optim["schedule"], f"must be one of {SCHEDULES}", "optim")
  if not 0 <= optim["muon_momentum"] < 1:
    _fail("muon_momentum", optim["muon_momentum"], "must be in [0, 1)", "optim")
  _check_positive_ints("optim", optim, ("muon_ns_steps",))
  if not isinstance(optim["muon_match_adamw_rms"], bool):
    _fail("muon_match_adamw_rms", optim["muon_match_adamw_rms"], "must be True or False", "optim")
  for field in ("peak_lr", "eps"):
    if not optim[field] > 0:
      _fail(field, optim[field], "must be > 0", "optim")
  for field in ("b1", "b2", "min_lr_ratio", "wsd_decay_fraction"):
    if not 0 <= optim[field] <= 1:
      _fail(field, optim[field], "must be in [0, 1]", "optim")
  for field in ("weight_decay", "grad_clip_norm", "warmup_steps"):
    if optim[field] < 0:
      _fail(field, optim[field], "must be >= 0", "optim")
  _check_positive_ints("train", train, ("num_steps", "log_every", "eval_every", "eval_batches",
                                        "checkpoint_every", "max_to_keep"))
  if not isinstance(train["dynamics_every"], int) or train["dynamics_every"] < 0:
    _fail("dynamics_every", train["dynamics_every"], "must be an integer >= 0 (0 = off)", "train")
  decay_steps = round(optim["wsd_decay_fraction"] * train["num_steps"]) if optim["schedule"] == "wsd" else 1
  if optim["warmup_steps"] + decay_steps > train["num_steps"]:
    _fail("warmup_steps", optim["warmup_steps"],
          f"warmup (+ wsd decay) must fit in config.train.num_steps={train['num_steps']}", "optim")
  if not 0 <= data["seed"] < 2**32:
    _fail("seed", data["seed"], "must be in [0, 2**32)", "data")
  if not isinstance(train["loss_chunk_size"], int) or train["loss_chunk_size"] < 0:
    _fail("loss_chunk_size", train["loss_chunk_size"], "must be an integer >= 0 (0 = the whole batch at once)",
          "train")
  if train["loss_chunk_size"] and data["seq_len"] % train["loss_chunk_size"]:
    _fail("loss_chunk_size", train["loss_chunk_size"], f"must divide config.data.seq_len={data['seq_len']} "
          "(each chunk takes that many positions of every sequence)", "train")
  _check_profile_steps(train["profile_steps"], train["num_steps"])
  _check_field_names(config, "resume_accept_changes")


def _check_profile_steps(value: Any, num_steps: int) -> None:
  """`config.train.profile_steps` is "" or "first:last" with 1 <= first <= last <= num_steps."""
  if value == "":
    return
  parts = value.split(":") if isinstance(value, str) else []
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    _fail("profile_steps", value, "must be 'first:last' (steps, e.g. '20:25') or '' (off)", "train")
  first, last = map(int, parts)
  if not 1 <= first <= last <= num_steps:
    _fail("profile_steps", value, f"needs 1 <= first <= last <= config.train.num_steps={num_steps}", "train")


def _check_field_names(config: Mapping[str, Any], field: str) -> None:
  """`config.train.<field>` is a comma-separated list of dotted config fields that exist."""
  value = config["train"][field]
  if not isinstance(value, str):
    _fail(field, value, "must be a string of comma-separated dotted fields, e.g. 'data.path,optim.peak_lr'", "train")
  for name in filter(None, (part.strip() for part in value.split(","))):
    node = config
    for key in name.split("."):
      if not hasattr(node, "keys") or key not in node.keys():  # a ConfigDict is no collections Mapping
        _fail(field, value, f"names {name!r}, which is not a config field", "train")
      node = node[key]
