"""Building blocks shared by every JanusFlow component.

Every parameter is created through `param_init(init, axes)`, which attaches logical axis
names (see `jfl/sharding.py` for the rules that map them onto a device mesh). Parameters are
float32; `dtype` on a module is the compute dtype (bfloat16 on accelerators).

Shape letters: B batch, L sequence, D width, C channels, h w spatial.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

default_kernel_init = nn.initializers.normal(stddev=0.02)


def param_init(init, axes: Sequence[str | None]):
  """Wraps an initializer so the created parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


class DenseGeneral(nn.Module):
  """`y = x . kernel + bias` contracting the trailing `len(in_axes)` dims of x.

  The kernel is created at its full rank [*in_dims, *features] (flax's own DenseGeneral
  initialises a flattened 2-D kernel, which breaks rank-n logical sharding specs).
  """
  features: int | tuple[int, ...]
  axes: tuple[str | None, ...]
  bias_axes: tuple[str | None, ...] | None = None
  n_in: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_dims = x.shape[x.ndim - self.n_in:]
    kernel = self.param("kernel", param_init(default_kernel_init, self.axes), (*in_dims, *features), jnp.float32)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.n_in)
    if self.use_bias:
      bias_axes = tuple(self.axes[-len(features):]) if self.bias_axes is None else self.bias_axes
      y = y + self.param("bias", param_init(nn.initializers.zeros_init(), bias_axes), features,
                         jnp.float32).astype(self.dtype)
    return y


def dense(features, axes, name, use_bias=True, dtype=jnp.float32, n_in=1, bias_axes=None):
  """A `DenseGeneral` whose kernel [*in, *features] and bias [*features] carry logical axis names.

  Args:
    features: int or tuple of output dims.
    axes: logical names of the kernel dims (contracted dims first, then `features`).
    name: submodule name (the converter's mapping table depends on it); None inside `setup`.
    n_in: number of trailing input dims contracted (2 for an output projection over [heads, head_dim]).
    bias_axes: logical names of the bias dims; defaults to the trailing `len(features)` of `axes`.
  """
  return DenseGeneral(features, tuple(axes), bias_axes, n_in, use_bias, dtype, name=name)


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: `scale * cast(x32 * rsqrt(mean(x32^2) + eps), x.dtype)` over the last axis.

  The normalisation runs in float32 and is cast back to the input dtype *before* the scale is
  applied, exactly as transformers' `LlamaRMSNorm` (used for every RMSNorm in JanusFlow).
  """

  eps: float = 1e-6
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", param_init(nn.initializers.ones_init(), (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def layer_norm(eps, name, dtype=jnp.float32, axis_name="norm"):
  """LayerNorm with scale and bias (SigLIP uses eps 1e-6)."""
  return nn.LayerNorm(
      epsilon=eps,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=param_init(nn.initializers.ones_init(), (axis_name,)),
      bias_init=param_init(nn.initializers.zeros_init(), (axis_name,)),
      name=name,
  )


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, PyTorch's `nn.GELU()` default. `jax.nn.gelu` defaults to tanh."""
  return jax.nn.gelu(x, approximate=False)
