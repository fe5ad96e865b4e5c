"""PyTorch state_dict <-> Flax params: the mapping table and its strict, invertible application.

A `Rule` names one PyTorch tensor (or a per-layer family `...layers.{i}...` stacked on a
leading `layers` axis), the Flax leaf it fills, and a layout hook:

  LINEAR   nn.Linear [out, in] (or a 1x1 conv [out, in, 1, 1]) -> kernel [in..., out...]
  CONV     nn.Conv2d OIHW -> HWIO (depthwise [C, 1, kh, kw] -> [kh, kw, 1, C])
  RESHAPE  same values, new shape (biases of fused heads, GRN [1, 1, 1, C] -> [C], norms)

`to_flax` consumes every source tensor or fails listing the leftovers; fills every target leaf
or fails listing the missing ones; checks every shape. `to_torch` is its exact inverse.
"""

import dataclasses
import re
from typing import Callable, Iterable, Mapping

import numpy as np

from jfl.models.config import JanusFlowConfig, VAEConfig


@dataclasses.dataclass(frozen=True)
class Hook:
  name: str
  to_flax: Callable[[np.ndarray, tuple], np.ndarray]   # (torch tensor, flax shape)
  to_torch: Callable[[np.ndarray, tuple], np.ndarray]  # (flax leaf, torch shape)


LINEAR = Hook(
    "linear",
    lambda w, shape: w.reshape(w.shape[0], -1).T.reshape(shape),
    lambda k, shape: k.reshape(-1, shape[0]).T.reshape(shape),
)
CONV = Hook("conv", lambda w, shape: w.transpose(2, 3, 1, 0), lambda k, shape: k.transpose(3, 2, 0, 1))
RESHAPE = Hook("reshape", lambda w, shape: w.reshape(shape), lambda k, shape: k.reshape(shape))


@dataclasses.dataclass(frozen=True)
class Rule:
  """`src` is a torch key; with `stack=n` it contains `{i}` and n tensors stack on axis 0."""
  src: str
  dst: tuple[str, ...]
  hook: Hook
  torch_shape: tuple[int, ...]
  stack: int = 0

  def sources(self) -> list[str]:
    return [self.src.format(i=i) for i in range(self.stack)] if self.stack else [self.src]


class ConversionError(ValueError):
  """A checkpoint does not match the model: lists every offending key and shape."""


# ----------------------------------------------------------------------------------------------
# The JanusFlow table (names from the reference `MultiModalityCausalLM` state_dict).
# ----------------------------------------------------------------------------------------------

# Tensors in the released checkpoint that the reference forward never executes.
IGNORED_SOURCES = (
    r"vision_und_enc_model\.vision_tower\.attn_pool\..*",  # SigLIP MAP head: ignore_head=True
)


def _linear(src, dst, out_dim, in_dim, bias=True, stack=0, bias_shape=None):
  rules = [Rule(src + ".weight", dst + ("kernel",), LINEAR, (out_dim, in_dim), stack)]
  if bias:
    rules.append(Rule(src + ".bias", dst + ("bias",), RESHAPE, (out_dim,), stack))
  return rules


def _norm(src, dst, dim, bias=False, stack=0):
  rules = [Rule(src + ".weight", dst + ("scale",), RESHAPE, (dim,), stack)]
  if bias:
    rules.append(Rule(src + ".bias", dst + ("bias",), RESHAPE, (dim,), stack))
  return rules


def _conv(src, dst, out_c, in_c, k, stack=0):
  return [Rule(src + ".weight", dst + ("kernel",), CONV, (out_c, in_c, k, k), stack),
          Rule(src + ".bias", dst + ("bias",), RESHAPE, (out_c,), stack)]


def _convnext(src, dst, c, cond):
  return [
      *_conv(src + ".depthwise", dst + ("depthwise",), c, 1, 7),
      *_norm(src + ".norm", dst + ("norm",), c),
      *_linear(src + ".channelwise_linear_1", dst + ("channelwise_linear_1",), 4 * c, c),
      Rule(src + ".channelwise_norm.weight", dst + ("channelwise_norm", "scale"), RESHAPE, (1, 1, 1, 4 * c)),
      Rule(src + ".channelwise_norm.bias", dst + ("channelwise_norm", "bias"), RESHAPE, (1, 1, 1, 4 * c)),
      *_linear(src + ".channelwise_linear_2", dst + ("channelwise_linear_2",), c, 4 * c),
      *_linear(src + ".cond_embeds_mapper", dst + ("cond_embeds_mapper",), 2 * c, cond),
  ]


def llama_rules(cfg, src="language_model", dst=("llm",)) -> list[Rule]:
  d, n, k, h, f, nl = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.intermediate_size, cfg.num_layers)
  lay, ldst = f"{src}.model.layers.{{i}}", dst + ("layers",)
  return [
      Rule(f"{src}.model.embed_tokens.weight", dst + ("embed_tokens", "embedding"), RESHAPE, (cfg.vocab_size, d)),
      *_norm(f"{lay}.input_layernorm", ldst + ("input_layernorm",), d, stack=nl),
      *_linear(f"{lay}.self_attn.q_proj", ldst + ("self_attn", "q_proj"), n * h, d, bias=False, stack=nl),
      *_linear(f"{lay}.self_attn.k_proj", ldst + ("self_attn", "k_proj"), k * h, d, bias=False, stack=nl),
      *_linear(f"{lay}.self_attn.v_proj", ldst + ("self_attn", "v_proj"), k * h, d, bias=False, stack=nl),
      *_linear(f"{lay}.self_attn.o_proj", ldst + ("self_attn", "o_proj"), d, n * h, bias=False, stack=nl),
      *_norm(f"{lay}.post_attention_layernorm", ldst + ("post_attention_layernorm",), d, stack=nl),
      *_linear(f"{lay}.mlp.gate_proj", ldst + ("mlp", "gate_proj"), f, d, bias=False, stack=nl),
      *_linear(f"{lay}.mlp.up_proj", ldst + ("mlp", "up_proj"), f, d, bias=False, stack=nl),
      *_linear(f"{lay}.mlp.down_proj", ldst + ("mlp", "down_proj"), d, f, bias=False, stack=nl),
      *_norm(f"{src}.model.norm", dst + ("norm",), d),
      *_linear(f"{src}.lm_head", dst + ("lm_head",), cfg.vocab_size, d, bias=False),
  ]


def siglip_rules(cfg, src="vision_und_enc_model.vision_tower", dst=("siglip",)) -> list[Rule]:
  c, m, nb, p = cfg.width, cfg.mlp_dim, cfg.num_blocks, cfg.patch_size
  blk, bdst = f"{src}.blocks.{{i}}", dst + ("blocks",)
  return [
      *_conv(f"{src}.patch_embed.proj", dst + ("patch_embed",), c, 3, p),
      Rule(f"{src}.pos_embed", dst + ("pos_embed",), RESHAPE, (1, cfg.grid ** 2, c)),
      *_norm(f"{blk}.norm1", bdst + ("norm1",), c, bias=True, stack=nb),
      *_linear(f"{blk}.attn.qkv", bdst + ("attn", "qkv"), 3 * c, c, stack=nb),
      *_linear(f"{blk}.attn.proj", bdst + ("attn", "proj"), c, c, stack=nb),
      *_norm(f"{blk}.norm2", bdst + ("norm2",), c, bias=True, stack=nb),
      *_linear(f"{blk}.mlp.fc1", bdst + ("mlp", "fc1"), m, c, stack=nb),
      *_linear(f"{blk}.mlp.fc2", bdst + ("mlp", "fc2"), c, m, stack=nb),
      *_norm(f"{src}.norm", dst + ("norm",), c, bias=True),
  ]


def gen_enc_rules(cfg, d, src="vision_gen_enc_model", dst=("gen_enc",)) -> list[Rule]:
  c, p = cfg.channels, cfg.patch_size
  return [
      *_linear(f"{src}.time_embed.linear_1", dst + ("time_embed", "linear_1"), d, c),
      *_linear(f"{src}.time_embed.linear_2", dst + ("time_embed", "linear_2"), d, d),
      *_conv(f"{src}.in_conv", dst + ("in_conv",), c, cfg.latent_channels, p),
      *[r for j in range(cfg.num_blocks)
        for r in _convnext(f"{src}.mid_block.res_blocks.{j}", dst + (f"res_blocks_{j}",), c, d)],
  ]


def gen_dec_rules(cfg, d, src="vision_gen_dec_model", dst=("gen_dec",)) -> list[Rule]:
  c2, out = 2 * cfg.channels, cfg.latent_channels * cfg.patch_size ** 2
  return [
      *_norm(f"{src}.input_norm", dst + ("input_norm",), cfg.channels),
      *[r for j in range(cfg.num_blocks)
        for r in _convnext(f"{src}.mid_block.res_blocks.{j}", dst + (f"res_blocks_{j}",), c2, d)],
      *_norm(f"{src}.out_convs.0.norm", dst + ("out_norm",), c2),
      Rule(f"{src}.out_convs.0.unpatch_conv.weight", dst + ("unpatch_conv", "kernel"), LINEAR, (out, c2, 1, 1)),
      Rule(f"{src}.out_convs.0.unpatch_conv.bias", dst + ("unpatch_conv", "bias"), RESHAPE, (out,)),
  ]


def janusflow_rules(cfg: JanusFlowConfig) -> list[Rule]:
  """Every tensor of the reference `MultiModalityCausalLM` state_dict (587 for the release)."""
  d, cg = cfg.llm.hidden_size, cfg.gen.channels
  return [
      *llama_rules(cfg.llm),
      *siglip_rules(cfg.siglip),
      *_linear("vision_und_enc_aligner", ("und_aligner",), d, cfg.siglip.width),
      Rule("beg_of_und_embed", ("beg_of_und_embed",), RESHAPE, (1, d)),
      *gen_enc_rules(cfg.gen, d),
      *_linear("vision_gen_enc_aligner", ("gen_enc_aligner",), d, cg),
      *gen_dec_rules(cfg.gen, d),
      *_norm("vision_gen_dec_aligner_norm", ("gen_dec_aligner_norm",), d),
      *_linear("vision_gen_dec_aligner", ("gen_dec_aligner",), cg, d),
  ]


# ----------------------------------------------------------------------------------------------
# The VAE table is derived from the Flax tree: the Flax modules use diffusers' names with
# `name_i` for `name.i`, kernels are convs (4-D) or linears (2-D, the mid-block attention).
# ----------------------------------------------------------------------------------------------

# Older diffusers checkpoints name the mid-block attention projections differently.
VAE_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_rules(flax_shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[Rule]:
  rules = []
  for path, shape in flax_shapes.items():
    torch_name = ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path[:-1])
    leaf = path[-1]
    if leaf == "kernel" and len(shape) == 4:
      rules.append(Rule(f"{torch_name}.weight", path, CONV, (shape[3], shape[2], shape[0], shape[1])))
    elif leaf == "kernel":
      rules.append(Rule(f"{torch_name}.weight", path, LINEAR, tuple(reversed(shape))))
    else:
      rules.append(Rule(f"{torch_name}.{'weight' if leaf == 'scale' else leaf}", path, RESHAPE, shape))
  return rules


def rename_legacy_vae_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state.items():
    parts = key.split(".")
    if len(parts) > 2 and parts[-2] in VAE_LEGACY_NAMES:
      key = ".".join(parts[:-2] + [VAE_LEGACY_NAMES[parts[-2]], parts[-1]])
      if value.ndim == 4:  # legacy attention projections were stored as 1x1 convs
        value = value[:, :, 0, 0]
    out[key] = value
  return out


# ----------------------------------------------------------------------------------------------
# Applying a table.
# ----------------------------------------------------------------------------------------------

def flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _fmt(shape):
  return "[" + ", ".join(str(s) for s in shape) + "]"


def to_flax(state: Mapping[str, np.ndarray], rules: Iterable[Rule],
            target_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
            ignored: Iterable[str] = (), progress: Callable[[], None] | None = None) -> dict:
  """Applies `rules` to a torch state_dict (numpy values) and returns a nested Flax params dict.

  Raises ConversionError listing every missing source tensor, source shape mismatch, unused
  source tensor (unless it matches a regex in `ignored`), unfilled or unknown target leaf.
  """
  problems, flat, used = [], {}, set()
  for rule in rules:
    missing = [s for s in rule.sources() if s not in state]
    used.update(s for s in rule.sources() if s in state)  # present layers are accounted for either way
    if missing:
      problems.append(f"missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more layers)" if len(missing) > 1 else ""))
      continue
    bad = [s for s in rule.sources() if tuple(state[s].shape) != rule.torch_shape]
    if bad:
      problems.append(f"tensor {bad[0]} has shape {_fmt(state[bad[0]].shape)}, expected {_fmt(rule.torch_shape)}")
      continue
    if rule.dst not in target_shapes:
      problems.append(f"rule for {rule.src} targets unknown parameter {'/'.join(rule.dst)}")
      continue
    shape = tuple(target_shapes[rule.dst])
    per_layer = shape[1:] if rule.stack else shape
    arrays = [rule.hook.to_flax(np.asarray(state[s]), per_layer) for s in rule.sources()]
    flat[rule.dst] = np.stack(arrays) if rule.stack else arrays[0]
    if progress:
      progress()
  ignored_re = [re.compile(p) for p in ignored]
  extra = sorted(k for k in state if k not in used and not any(r.fullmatch(k) for r in ignored_re))
  problems += [f"unexpected tensor {k} {_fmt(state[k].shape)}" for k in extra]
  problems += [f"parameter {'/'.join(p)} {_fmt(s)} has no source tensor"
               for p, s in target_shapes.items() if p not in flat and not any(r.dst == p for r in rules)]
  if problems:
    raise ConversionError(f"{len(problems)} problem(s) converting the checkpoint:\n  " + "\n  ".join(problems))
  return unflatten(flat)


def to_torch(params: Mapping, rules: Iterable[Rule]) -> dict[str, np.ndarray]:
  """Inverse of `to_flax`: a torch-layout state_dict of numpy arrays."""
  flat, out = flatten(params), {}
  for rule in rules:
    leaf = np.asarray(flat[rule.dst])
    for i, src in enumerate(rule.sources()):
      out[src] = np.ascontiguousarray(rule.hook.to_torch(leaf[i] if rule.stack else leaf, rule.torch_shape))
  return out


def shapes_of(params) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of a (possibly abstract, possibly logically boxed) params tree."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return {p: tuple(v.shape) for p, v in flatten(nn.meta.unbox(params)).items()}
