"""Device mesh and logical-axis rules: how parameters, optimizer state and batches are laid out.

Mesh axes are ("data", "fsdp", "tensor"). `config.mesh` gives the degree of each axis inside a
slice (`data`, `fsdp`, `tensor`, one of them may be -1 = the rest of the devices) and across
slices/hosts (`dcn_data`, `dcn_fsdp`, `dcn_tensor`, default 1). Logical axis names (see the
`param_init` / `dense` calls in jfl/models) map to mesh axes through one of the `RULES` presets:

  dp        every weight replicated; the batch split over all three axes.
  fsdp      weights split on their `embed` (else `conv_out`/`embed_vision`) dim over `fsdp`;
            the batch split over all three axes.
  fsdp_tp   as fsdp, plus Megatron-style tensor parallelism: `mlp`, `heads`, `kv_heads`, `vocab`
            (and the matching activations) split over `tensor`; the batch over (data, fsdp);
            conv-head activations split by channel over `tensor`. (That last rule also avoids an
            XLA SPMD bug: the kernel gradient of a depthwise conv whose batch is replicated over a
            mesh axis comes out multiplied by that axis' size; tests/test_sharding.py catches it.)

Rules are tried in order and a mesh axis is used once per array, so a later rule for the same
mesh axis is a fallback (flax semantics). A dimension that a mesh axis does not divide is left
unsplit on that axis (`fit_spec`), so tiny models run on any mesh.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# Every logical axis name used by jfl/models (tests/test_sharding.py checks the list is complete).
PARAM_AXES = ("vocab", "embed", "embed_vision", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm",
              "conv_in", "conv_out", "conv_h", "conv_w")
ACT_AXES = ("act_batch", "act_len", "act_embed", "act_mlp", "act_heads", "act_height", "act_width",
            "act_channels")

_REPLICATED = tuple((name, None) for name in PARAM_AXES + ACT_AXES)
_ALL = ("data", "fsdp", "tensor")

RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    "dp": (("act_batch", _ALL),) + _REPLICATED,
    "fsdp": (("act_batch", _ALL), ("embed", "fsdp"), ("conv_out", "fsdp"), ("embed_vision", "fsdp"),
             ("vocab", "fsdp")) + _REPLICATED,
    "fsdp_tp": (("act_batch", ("data", "fsdp")),
                ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
                ("act_mlp", "tensor"), ("act_heads", "tensor"), ("act_channels", "tensor"),
                ("embed", "fsdp"), ("conv_out", "fsdp"), ("embed_vision", "fsdp")) + _REPLICATED,
}


def rules(name: str) -> tuple[tuple[str, Any], ...]:
  """The logical-axis rules of preset `name` (a key of `RULES`)."""
  if name not in RULES:
    raise ValueError(f"unknown sharding preset {name!r}; known: {', '.join(RULES)}")
  return RULES[name]


def mesh_shape(mesh_config, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici, dcn) degrees of AXES; the single -1 in ici is filled so that ici x dcn = num_devices."""
  ici = [int(mesh_config.get(a, 1)) for a in AXES]
  dcn = [int(mesh_config.get(f"dcn_{a}", 1)) for a in AXES]
  if any(d < 1 for d in dcn) or any(d == 0 or d < -1 for d in ici) or ici.count(-1) > 1:
    raise ValueError(f"mesh degrees must be positive (one ici -1 allowed), got ici {ici} dcn {dcn}")
  per_slice, rem = divmod(num_devices, math.prod(dcn))
  if rem:
    raise ValueError(f"{num_devices} devices do not split into dcn {dcn}")
  if -1 in ici:
    known = -math.prod(ici)
    if per_slice % known:
      raise ValueError(f"mesh {dict(zip(AXES, ici))}: {per_slice} devices per slice not divisible by {known}")
    ici[ici.index(-1)] = per_slice // known
  if math.prod(ici) != per_slice:
    raise ValueError(f"mesh {dict(zip(AXES, ici))} x dcn {dcn} needs {math.prod(ici) * math.prod(dcn)} "
                     f"devices, have {num_devices}")
  return tuple(ici), tuple(dcn)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """Mesh over `devices` (default all) with named AXES, Auto axis types."""
  devices = jax.devices() if devices is None else list(devices)
  ici, dcn = mesh_shape(mesh_config, len(devices))
  types = (jax.sharding.AxisType.Auto,) * len(AXES)
  if math.prod(dcn) == 1:
    return jax.make_mesh(ici, AXES, axis_types=types, devices=devices)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=devices[0].platform != "tpu")
  return jax.sharding.Mesh(grid, AXES, axis_types=types)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """Drops the mesh axes of `spec` that do not divide their dimension of `shape`."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept, size = [], 1
    for a in names:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rule_set) -> Any:
  """NamedShardings of a tree whose leaves are boxed (nn.LogicallyPartitioned) or plain.

  Plain leaves (no logical names) are replicated. The result matches the *unboxed* tree.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rule_set)
  shapes = nn.meta.unbox(abstract_tree)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(s, np.shape(x), mesh)), mesh_specs, shapes,
                      is_leaf=lambda s: isinstance(s, P))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(rule_set) -> P:
  """PartitionSpec of a batch array's leading (row) dim: where `act_batch` goes."""
  return P(*nn.logical_to_mesh_axes(("act_batch",), rule_set))


def batch_shardings(batch_shapes: dict, mesh: jax.sharding.Mesh, rule_set) -> dict:
  """Row-sharded NamedShardings for every key of a batch (dict of arrays or ShapeDtypeStructs)."""
  spec = batch_spec(rule_set)
  return {k: NamedSharding(mesh, fit_spec(spec, np.shape(v), mesh)) for k, v in batch_shapes.items()}


def batch_divisor(mesh: jax.sharding.Mesh, rule_set) -> int:
  """How many shards the batch rows are split into (the global batch must be a multiple)."""
  axes = batch_spec(rule_set)[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def to_global(local_batch: dict, shardings: dict) -> dict:
  """Host-local numpy rows -> global jax Arrays (rows of all processes stacked in process order)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local_batch.items()}


def abstract_with_shardings(shapes, shardings):
  """ShapeDtypeStructs carrying shardings (for AOT lowering and sharded restores)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=s),
                      shapes, shardings)
