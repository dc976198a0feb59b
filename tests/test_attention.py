"""Cross-attention with padded text keys (lesiongen/diffusion/attention.py): the same outputs as diffusers'
default processor, with the CPU kernel called on a multiple of 16 keys."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode

from lesiongen.diffusion.attention import PaddedKeysAttnProcessor, pad_cross_attention_keys


class KeyCounts(TorchDispatchMode):
    """The number of keys of every attention kernel call."""

    def __init__(self):
        super().__init__()
        self.keys: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.startswith("_scaled_dot_product"):
            self.keys.append(args[1].shape[-2])
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def forward(unet, tokens: int):
    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, tokens, 64)
    with KeyCounts() as counts:
        out = unet(x, t, text).sample
    return out, counts.keys


def test_padded_text_keys_give_the_default_attention_with_a_multiple_of_16_keys(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    cross = sum(1 for name, _ in unet.named_modules() if name.endswith(".attn2"))
    out, keys = forward(unet, 77)
    assert sorted(set(keys)) == [64, 77, 256]  # self-attention at 8x8 and 16x16 latents; CLIP's 77 tokens
    keys_of_64_tokens = forward(unet, 64)[1]

    assert pad_cross_attention_keys(unet, torch.device("cpu")) == cross
    padded_out, padded_keys = forward(unet, 77)
    assert padded_keys.count(80) == cross and 77 not in padded_keys
    torch.testing.assert_close(padded_out, out, rtol=1e-5, atol=1e-5)
    assert forward(unet, 64)[1] == keys_of_64_tokens  # keys already a multiple of 16 are not padded


def test_only_default_processors_on_a_cpu_are_replaced(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    assert pad_cross_attention_keys(unet, "cuda:0") == 0
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())

    names = [name for name in unet.attn_processors if ".attn2." in name]
    unet.set_attn_processor({n: AttnProcessor() if n == names[0] else p for n, p in unet.attn_processors.items()})
    assert pad_cross_attention_keys(unet, "cpu") == len(names) - 1
    processors = unet.attn_processors
    assert type(processors[names[0]]) is AttnProcessor  # a user's own processor is kept
    assert all(type(processors[n]) is PaddedKeysAttnProcessor for n in names[1:])
    assert all(type(p) is AttnProcessor2_0 for n, p in processors.items() if ".attn1." in n)  # self-attention


def test_compiled_sampling_on_a_cpu_pads_the_text_keys_and_eager_sampling_does_not(tiny_sd_dir):
    from lesiongen.diffusion.generate import GenerateConfig, compile_denoiser, load_model

    pipe = load_model(GenerateConfig(model_path=str(tiny_sd_dir), condition="mel"), "cpu")
    eager = pipe.unet.attn_processors
    assert {type(p) for p in eager.values()} == {AttnProcessor2_0}
    compile_denoiser(pipe)  # wraps the UNet; compilation itself waits for the first call
    processors = pipe.unet._orig_mod.attn_processors
    assert {type(p) for n, p in processors.items() if ".attn2." in n} == {PaddedKeysAttnProcessor}
    assert {type(p) for n, p in processors.items() if ".attn1." in n} == {AttnProcessor2_0}
