import open_clip

from lesiongen.tokens import CLIP_MAX_TOKENS, clip_tokenizer, count_tokens, write_tokenizer_files


def test_ids_match_open_clip_on_dermatology_prompts():
    ours = clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-B-32")
    prompts = [
        "a dermoscopic image of melanoma with atypical pigment network and blue-whitish veil",
        "basal cell carcinoma, arborizing vessels, on the head and neck of an 80-year-old man",
        "seborrheic keratosis; milia-like cysts, light skin",
    ]
    for p in prompts:
        ids = ours(p)["input_ids"]
        assert ids == reference([p])[0].tolist()[: len(ids)]
        assert ids[0] == 49406 and ids[-1] == 49407
    assert len(ours) == 49408 and ours.model_max_length == CLIP_MAX_TOKENS


def test_count_tokens_does_not_truncate():
    long = "melanoma " * 100
    assert count_tokens(long) == 102


def test_written_folder_loads_with_transformers(tmp_path):
    from transformers import CLIPTokenizer

    write_tokenizer_files(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 77
    assert tok("dermatofibroma")["input_ids"] == clip_tokenizer()("dermatofibroma")["input_ids"]
