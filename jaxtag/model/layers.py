"""The network's building blocks with PyTorch's semantics: init, Dense/Conv, BatchNorm, LayerNorm.

The original is a PyTorch model, and the released weights' BatchNorm statistics, init scales and
LayerNorm epsilon are PyTorch's; these helpers give the Flax modules the same behaviour.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtag.model.config import BN_EPS, BN_MOMENTUM, LN_EPS, ModelConfig

Array = jax.Array


def torch_uniform_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Conv/Linear init: U(+-1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(features: int, fan_in: int, config: ModelConfig, name: str | None) -> nn.Dense:
    """A Linear layer initialised like PyTorch's, at the configured dtype and precision."""
    init = torch_uniform_init(fan_in)
    return nn.Dense(
        features,
        dtype=jnp.dtype(config.dtype),
        precision=config.lax_precision,
        kernel_init=init,
        bias_init=init,
        name=name,
    )


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch semantics, over the last axis.

    Flax's BatchNorm keeps the *biased* batch variance in its running average; PyTorch keeps the
    unbiased one (n / (n - 1)). The released weights' running statistics and the parity tests
    follow PyTorch, so this module does too. Under pmap, `axis_name` averages the batch moments
    across devices, which gives the statistics of the global batch.
    """

    axis_name: str | None = None
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS

    @nn.compact
    def statistics(
        self, features: int, train: bool, moments: tuple[Array, Array, Any] | None = None
    ) -> tuple[Array, Array, Array, Array]:
        """(mean, 1 / std, scale, bias) with BN(x) = scale * (x - mean) / std + bias per channel.

        In training `moments` are the batch's (mean, var, count) from `batch_moments`, which
        also update the running statistics; otherwise the running statistics are used.
        """
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if train:
            mean, var, count = moments
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        return mean, jax.lax.rsqrt(var + self.epsilon), scale, bias

    def batch_moments(self, x: Array, weights: np.ndarray | None = None) -> tuple[Array, Any, Any]:
        """`batch_moments` of x over this device's batch and, under pmap, all devices' (the
        statistics of the global batch; not at init, where no axis is bound)."""
        return batch_moments(x, None if self.is_initializing() else self.axis_name, weights)

    def coefficients(
        self, features: int, train: bool, moments: tuple[Array, Array, Any] | None = None
    ) -> tuple[Array, Array]:
        """(a, c) with BN(x) = a * x + c per channel (see `statistics`)."""
        mean, inv_std, scale, bias = self.statistics(features, train, moments)
        a = scale * inv_std
        return a, bias - mean * a

    def __call__(self, x: Array, train: bool) -> Array:
        moments = self.batch_moments(x) if train else None
        a, c = self.coefficients(x.shape[-1], train, moments)
        return (x.astype(jnp.float32) * a + c).astype(x.dtype)


def batch_moments(
    x: Array, axis_name: str | None, weights: np.ndarray | None = None
) -> tuple[Array, Array, Any]:
    """Per-channel (last axis) mean, biased variance and count over all other axes, and over
    the devices of `axis_name`: the global batch's statistics under pmap.

    Two passes (mean, then mean squared deviation), as PyTorch: E[x^2] - E[x]^2 loses digits in
    float32 when the mean is large next to the spread (dB inputs, conv maps). `weights`
    (broadcastable to x without its channel axis, plus a trailing 1) counts some positions
    0 or 1 times (the blocked convolutions of jaxtag/kernels.py compute some rows twice).
    """
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    local_count = math.prod(x.shape[:-1])
    if weights is not None:
        local_count = local_count // math.prod(weights.shape[:-1]) * int(weights.sum())

    def local_mean(values: Array) -> Array:
        return (values if weights is None else values * weights).sum(axes) / local_count

    mean, count = local_mean(x32), local_count
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
        count = count * jax.lax.psum(1, axis_name)
    var = local_mean(jnp.square(x32 - mean))
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
    return mean, var, count


def conv(features: int, kernel_size: tuple[int, ...], config: ModelConfig, name: str) -> nn.Conv:
    """A convolution initialised like PyTorch's, valid in frequency and same in time: the
    time axis (second to last) is zero-padded by half the kernel width on both sides."""
    init = torch_uniform_init(math.prod(kernel_size))  # one input channel
    padding = [(0, 0)] * (len(kernel_size) - 1) + [(kernel_size[-1] // 2,) * 2]
    return nn.Conv(
        features,
        kernel_size,
        padding=padding,
        dtype=jnp.dtype(config.dtype),
        precision=config.lax_precision,
        kernel_init=init,
        bias_init=init,
        name=name,
    )


def layer_norm(x: Array) -> Array:
    """BERT LayerNorm (eps 1e-12) under the key `LayerNorm`, computed in float32."""
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="LayerNorm")(x.astype(jnp.float32))
    return y.astype(x.dtype)
