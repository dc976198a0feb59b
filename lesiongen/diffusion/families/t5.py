"""A small T5 tokenizer and encoder built offline, for the tiny builds of T5 families (tests and demos only).

No T5 tokenizer can be downloaded here, so one is trained on the project's own caption text: every
condition's concept and label captions and report prose as ``captions`` writes them. T5's tokenizer is a
Unigram model (transformers' T5 tokenizer loads no other kind); its pieces come from the ``tokenizers`` BPE
trainer, because on a corpus this small the library's Unigram trainer kept most words as single letters
(measured: the longest Derm7pt report took 356 tokens, against 200 this way). Real models load their own
tokenizer from their folder.
"""

from __future__ import annotations

import string

from .. import plans

VOCAB_SIZE = 1000  # an upper bound; the caption corpus yields about 530 pieces (T5 has 32k)
SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
ALPHABET = list(string.ascii_letters + string.digits + string.punctuation)  # measured reports hold digits and %


def caption_corpus(seed: int = 0) -> list[str]:
    """Concept and label captions and report prose (``long_text`` from metadata) of 50 planned records per
    condition, spread over every subgroup so each sex, age, site and skin tone is named."""
    from ... import labels
    from ...captions.reports import describe
    from ...captions.text import caption

    specs = plans.build_plan(
        list(labels.CODES), 50, seed, balance=list(plans.BALANCE_VALUES), guidance_scales=[1.0], steps=[1]
    )
    records = [s.record() for s in specs]
    captions = [caption(r, style, seed).text for r in records for style in ("concept", "label")]
    return captions + [describe(r, seed=seed)[2] for r in records]


def tiny_t5_tokenizer(max_length: int, seed: int = 0):
    """A T5 tokenizer (T5's special tokens and ids, ``</s>`` appended): a Unigram model over pieces the BPE
    trainer learned from the captions, every piece scored alike, so a text splits into the fewest pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    metaspace = {"replacement": "▁", "prepend_scheme": "always"}
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    learner.train_from_iterator(
        caption_corpus(seed),
        trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, initial_alphabet=ALPHABET),
    )
    pieces = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    tok = Tokenizer(models.Unigram([(p, 0.0 if p in SPECIALS else -1.0) for p, _ in pieces], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    tok.decoder = decoders.Metaspace(**metaspace)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def tiny_t5_encoder(vocab_size: int, d_model: int, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)
