"""The DINO / iBOT projection head (DINOv2 `DINOHead` semantics) in Flax NNX.

MLP `in -> hidden -> ... -> bottleneck` with exact GELU between layers, L2-normalise,
then a bias-free `bottleneck -> out_dim` prototype layer. DINOv3 (DINOCell) uses a
plain last layer; DINOv2 wraps it in weight norm with a trainable gain `g` (init 1).

Parameter paths: `mlp/<i>/{kernel,bias}`, `last_layer/kernel [bottleneck, out]` and,
with weight norm, `last_layer/gain [out]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dinocell_jax.models.vit import COMPUTE_DTYPES, Linear, torch_trunc_normal

# dinov2's F.normalize eps for fp32 inputs; we normalise in fp32 whatever the compute dtype.
L2_EPS = 1e-12


class LastLayer(nnx.Module):
    """Bias-free prototypes; optionally weight-normalised per prototype (torch weight_norm, dim=0)."""

    def __init__(self, in_dim: int, out_dim: int, *, weight_norm: bool, dtype, rngs: nnx.Rngs):
        if weight_norm:
            # dinov2 builds last_layer after its trunc-normal init pass, so v keeps torch's Linear
            # default U(+-1/sqrt(in)); DINOv3 re-initialises its plain last layer trunc-normal .02.
            bound = 1.0 / math.sqrt(in_dim)
            self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (in_dim, out_dim), jnp.float32, -bound, bound))
            self.gain = nnx.Param(jnp.ones((out_dim,), jnp.float32))
        else:
            self.kernel = nnx.Param(torch_trunc_normal(rngs.params(), (in_dim, out_dim)))
            self.gain = None
        self.dtype = dtype

    def weight(self) -> jax.Array:
        """The effective `[in, out]` fp32 prototype matrix."""
        kernel = self.kernel[...]
        if self.gain is None:
            return kernel
        # No eps, as torch's _weight_norm.
        return kernel * (self.gain[...] / jnp.linalg.norm(kernel, axis=0))

    def __call__(self, z: jax.Array) -> jax.Array:
        """z `[N, in]` -> logits `[N, out]` fp32 (matmul in `dtype`, fp32 accumulation)."""
        return jnp.dot(z.astype(self.dtype), self.weight().astype(self.dtype), preferred_element_type=jnp.float32)


class DINOHead(nnx.Module):
    """DINO / iBOT head; `project` and `prototypes` are separate so masked tokens can be gathered between them."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, weight_norm_last_layer: bool = False, dtype: str = "float32", *,
                 rngs: nnx.Rngs):
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"DINOHead: dtype {dtype!r} is not one of {tuple(COMPUTE_DTYPES)}")
        n_layers = max(n_layers, 1)  # as dinov2
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        cdt = COMPUTE_DTYPES[dtype]
        self.mlp = nnx.List([Linear(a, b, dtype=cdt, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.last_layer = LastLayer(bottleneck_dim, out_dim, weight_norm=weight_norm_last_layer, dtype=cdt, rngs=rngs)

    def project(self, x: jax.Array) -> jax.Array:
        """x `[N, in_dim]` -> `[N, bottleneck_dim]` fp32, unit L2 norm per row."""
        for i, layer in enumerate(self.mlp):
            x = layer(x)
            if i < len(self.mlp) - 1:
                x = jax.nn.gelu(x, approximate=False)
        x = x.astype(jnp.float32)
        # rsqrt(max(|x|^2, eps^2)) equals 1 / max(|x|, eps) but keeps a finite
        # gradient at x = 0 (the zero rows padding the iBOT buffer); the norm's
        # own gradient there is 0/0.
        sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(jnp.maximum(sq, L2_EPS * L2_EPS))

    def prototypes(self, z: jax.Array) -> jax.Array:
        """z `[N, bottleneck_dim]` -> logits `[N, out_dim]` fp32."""
        return self.last_layer(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[N, in_dim]` -> logits `[N, out_dim]` fp32."""
        return self.prototypes(self.project(x))
