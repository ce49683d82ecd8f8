"""Pre-packed oneDNN weights for bf16 decoding on CPUs: batch-1 decoding is a chain of matrix-vector products
bound by how fast weights stream from memory, and oneDNN's blocked layout streams them faster. Used by the
decode loop (`generate.CachedLM`) on every bf16 CPU model."""

from __future__ import annotations

import functools


def _packed_linear_class():
    import torch

    class PackedLinear(torch.nn.Linear):
        """An nn.Linear that, in inference, multiplies by a copy of its weight pre-packed into oneDNN's
        blocked layout (the layout torch.compile's CPU backend uses). Batch-1 decoding is a chain of
        matrix-vector products bound by how fast weights stream from memory; the packed layout reads them
        about 3x faster than the plain bf16 kernel on the large LM head here. Training, or any call with
        grad enabled, uses the plain weight; a weight changed in place (an optimizer step) is repacked."""

        def repack(self):
            weight = self.weight.detach()
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False)
            self.packed_version = self.weight._version

        def forward(self, x):
            if torch.is_grad_enabled() or x.dtype != self.weight.dtype:
                return super().forward(x)
            if self.packed_version != self.weight._version:
                self.repack()
            flat = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias,
                                                      "none", [], "")
            return flat.reshape(*x.shape[:-1], flat.shape[-1])

    return PackedLinear


@functools.cache
def _onednn_packs_bf16() -> bool:
    """Whether this machine's oneDNN can pre-pack bf16 linear weights: its bf16 kernels need AVX-512 (or
    AVX-NE-CONVERT). Probed once per process, since every decode batch asks."""
    import torch

    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


def pack_linear_weights(model) -> bool:
    """Switch a bf16 CPU model's Linear layers to pre-packed oneDNN weights (see PackedLinear). Weights,
    state_dict keys and outputs stay the same; it costs one extra copy of the linear weights in memory.
    Returns whether the model is packed. fp32 models are left alone (little gain, slightly different sums), and
    so are models on CPUs whose oneDNN has no bf16 kernels."""
    import torch

    if getattr(model, "_slmkit_packed", False):
        return True
    if model.dtype != torch.bfloat16 or model.device.type != "cpu" or not _onednn_packs_bf16():
        return False
    cls = _packed_linear_class()
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = cls
            module.repack()
    model._slmkit_packed = True
    return True
