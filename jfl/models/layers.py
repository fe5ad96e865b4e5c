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


def dense(features, axes, name, use_bias=True, dtype=jnp.float32, in_axis=-1, bias_axes=None):
  """A `DenseGeneral` whose kernel and bias carry logical axis names.

  Args:
    features: int or tuple of output dims.
    axes: logical names of the kernel dims (contracted dims first, then `features`).
    name: submodule name (the converter's mapping table depends on it).
    bias_axes: logical names of the bias dims; defaults to the trailing `len(features)` of `axes`.
  """
  n_out = 1 if isinstance(features, int) else len(features)
  bias_axes = tuple(axes[-n_out:]) if bias_axes is None else bias_axes
  return nn.DenseGeneral(
      features=features,
      axis=in_axis,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=param_init(default_kernel_init, axes),
      bias_init=param_init(nn.initializers.zeros_init(), bias_axes),
      name=name,
  )


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
