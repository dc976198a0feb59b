"""Cross-attention over text keys padded to a multiple of 16, for compiled sampling and training on a CPU.

PyTorch's CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) is fast when the number of
keys is a multiple of the vector width and slow on a remainder: CLIP's 77 text tokens took 2.3x as long as 80
at Stable Diffusion 1.x's shapes (2 images, 4096 queries, 8 heads of 40 channels) and 2.1x at the benchmark's
tiny model's (8 heads of 4), on this project's 2-core AVX-512 machine, and forward plus backward 1.3x and 1.5x.
Zero rows added to the keys and hidden by a mask of -inf give the same attention (the padded keys' weights are
exactly 0) at the 80-key cost: a compiled tiny-UNet call at batch 64 took 171 ms against 193.

The sums run in another order, though, so the rounding changes: in the demo 38 of 4.3 million pixel values
of its synthetic set moved by 1, enough to move a classifier trained on them (docs/results.md). So, like
``torch.compile``, which changes the rounding too, it is part of the compiled path that large sets and long
training runs take (``generate.compile_denoiser``, ``train.train``), and the demo's keep eager numerics. CUDA
kernels handle 77 keys at full speed and lose their fastest path with a mask, so only CPUs get it.
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

KEY_MULTIPLE = 16  # AVX-512 holds 16 float32 values; a multiple of 16 is one of 8 for AVX2 too


class PaddedKeysAttnProcessor(AttnProcessor2_0):
    """diffusers' default SDPA processor with the text keys padded to ``KEY_MULTIPLE`` and the padding masked.

    A call that brings its own mask, or keys already a multiple, goes to the default processor unchanged.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        keys = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attention_mask is not None or keys % KEY_MULTIPLE == 0:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
        padded = F.pad(encoder_hidden_states, (0, 0, 0, -keys % KEY_MULTIPLE))
        mask = hidden_states.new_zeros(padded.shape[0], 1, padded.shape[1])
        mask[..., keys:] = float("-inf")
        return super().__call__(attn, hidden_states, padded, mask, temb, *args, **kw)


def pad_cross_attention_keys(denoiser, device) -> int:
    """On a CPU, give every cross-attention layer of ``denoiser`` that runs diffusers' default processor the
    padded one; elsewhere leave it alone. Returns how many layers changed."""
    if getattr(device, "type", str(device).split(":")[0]) != "cpu":
        return 0
    layers = [
        m
        for m in denoiser.modules()
        if isinstance(m, Attention) and m.is_cross_attention and type(m.processor) is AttnProcessor2_0
    ]
    for layer in layers:
        layer.set_processor(PaddedKeysAttnProcessor())
    return len(layers)
