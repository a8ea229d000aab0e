"""Box-prompted SAM (facebookresearch/segment-anything) from a local checkpoint.

Per image the image encoder runs once (`SamPredictor.set_image`); then all of the image's boxes go
through the prompt encoder and mask decoder together, in chunks so that images with hundreds of
boxes keep memory bounded. With `batch_images` > 1 the worker first hands the masker up to that
many of a unit's images (`embed`): the encoder runs once on the batch (SAM's encoder takes
B x 3 x 1024 x 1024) and each image's embedding waits for its own call, which then only decodes.

Decoding is `SamPredictor.predict_torch` with one change: the best of the multimask candidates
is picked on the low-resolution logits, so only the kept mask is upsampled to full resolution
(predict_torch upsamples all three, 3x the memory for the same result).

Checkpoints are the official releases' plain state dicts (sam_vit_h_4b8939.pth...), loaded with
`weights_only=True`. They are checked against the requested variant before any work starts.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from pipelines.devices import (
    inference,
    place_model,
)
from pipelines.maskers import MaskOutput
from pipelines.maskers.sam_fast import compile_encoder, use_sdpa
from pipelines.maskers.scores import encode_chunk, pick_best, stability_scores
from pipelines.masksets import RleMasks

log = logging.getLogger(__name__)

# Full-resolution float32 logits of one chunk stay under this many pixels (512 MB).
MAX_CHUNK_PIXELS = 2**27


@dataclass(frozen=True)
class SamArch:
    """Shape of a SAM model; the released variants mirror segment_anything/build_sam.py."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_hidden_dim: int = 256


SAM_VARIANTS: dict[str, SamArch] = {
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
    # No released weights: a 0.5 M-parameter shape for tests, benchmarks and smoke runs.
    "tiny": SamArch(
        64,
        1,
        2,
        (0,),
        img_size=256,
        prompt_dim=32,
        decoder_mlp_dim=256,
        decoder_heads=2,
        iou_hidden_dim=64,
    ),
}


def build_sam(arch: SamArch) -> Sam:
    """A randomly initialised SAM of the given shape, in eval mode."""
    grid = arch.img_size // 16
    encoder = ImageEncoderViT(
        depth=arch.depth,
        embed_dim=arch.embed_dim,
        img_size=arch.img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=arch.num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=arch.global_attn_indexes,
        window_size=14,
        out_chans=arch.prompt_dim,
    )
    prompt = PromptEncoder(
        embed_dim=arch.prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(arch.img_size, arch.img_size),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2,
            embedding_dim=arch.prompt_dim,
            mlp_dim=arch.decoder_mlp_dim,
            num_heads=arch.decoder_heads,
        ),
        transformer_dim=arch.prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=arch.iou_hidden_dim,
    )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=prompt,
        mask_decoder=decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def checkpoint_shape(state: dict) -> tuple[int, int]:
    """(encoder embed dim, number of encoder blocks) of a SAM state dict."""
    embed_dim = int(state["image_encoder.patch_embed.proj.weight"].shape[0])
    blocks = {
        int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))
    }
    return embed_dim, len(blocks)


def variant_of(state: dict) -> str | None:
    """The SAM_VARIANTS name whose encoder shape the state dict has, or None."""
    embed_dim, depth = checkpoint_shape(state)
    for name, arch in SAM_VARIANTS.items():
        if (arch.embed_dim, arch.depth) == (embed_dim, depth):
            return name
    return None


def read_state_dict(path: Path) -> dict:
    """torch.load(weights_only=True) with every failure turned into one clear error."""
    if not path.exists():
        raise FileNotFoundError(f"SAM checkpoint {path} does not exist")
    if not path.is_file():
        raise ValueError(f"SAM checkpoint {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"SAM checkpoint {path} is not a readable PyTorch checkpoint "
            f"(corrupt, truncated or not a .pth file): {reason}"
        ) from None
    if not isinstance(state, dict) or "image_encoder.patch_embed.proj.weight" not in state:
        raise ValueError(
            f"SAM checkpoint {path} does not hold segment-anything weights: expected the state "
            "dict of a release such as sam_vit_h_4b8939.pth "
            "(no image_encoder.patch_embed.proj.weight)"
        )
    return state


def load_sam(path: Path | None, variant: str) -> Sam:
    """Check the checkpoint at `path` is a `variant` SAM and load it (CPU, eval mode)."""
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM model {variant!r}; choose one of: {', '.join(SAM_VARIANTS)}")
    if path is None:
        raise ValueError("--masker sam needs --sam-checkpoint (a segment-anything .pth file)")
    path = Path(path)
    state = read_state_dict(path)
    found = variant_of(state)
    if found != variant:
        embed_dim, depth = checkpoint_shape(state)
        shape = f"{found}-shaped" if found else "unknown-shaped"
        hint = f"pass --sam-model {found}" if found else f"known: {', '.join(SAM_VARIANTS)}"
        raise ValueError(
            f"{path} holds {shape} weights (image_encoder.blocks: {depth}, embed dim {embed_dim}), "
            f"not {variant}; {hint}"
        )
    sam = build_sam(SAM_VARIANTS[variant])
    missing, unexpected = sam.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the {variant} architecture: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    return sam


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 4) XYXY -> the same boxes clipped to the image [0, W] x [0, H]."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


def check_prompt(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, MaskOutput | None]:
    """Check the image of a SAM-family call and clip its boxes; the second value is the (empty)
    result to return at once when there are no boxes, else None."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"SAM expects an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}"
        )
    height, width = image.shape[:2]
    boxes = clip_boxes(boxes, height, width)
    if len(boxes):
        return boxes, None
    empty = np.zeros(0, dtype=np.float32)
    return boxes, MaskOutput(np.zeros((0, height, width), bool), empty, empty.copy())


class SamMasker:
    """Masker over a loaded `Sam`: one encoder pass per image, boxes decoded in chunks.

    multimask: ask the decoder for 3 candidates per box and keep the one with the highest
        predicted IoU (False: the single-mask output).
    min_region_area: holes and islands smaller than this many pixels are removed (0: off, as in
        SA-1B's released generator).
    box_chunk: most boxes decoded together; lowered for large images so a chunk's full-resolution
        logits stay under MAX_CHUNK_PIXELS.
    sdpa, compile: the encoder's speed options (pipelines/maskers/sam_fast.py); same masks.
    batch_images: most images embedded by one encoder call (`embed`); 1: one call per image.
        Batching helps GPUs (a batch fills the device); on CPU it only adds memory.
    """

    def __init__(
        self,
        sam: Sam,
        origin: str,
        device: str = "auto",
        dtype: str = "auto",
        multimask: bool = True,
        min_region_area: int = 0,
        box_chunk: int = 64,
        sdpa: bool = False,
        compile: bool = False,
        batch_images: int = 1,
    ) -> None:
        if box_chunk < 1:
            raise ValueError(f"box_chunk must be >= 1, got {box_chunk}")
        if batch_images < 1:
            raise ValueError(f"--sam-batch-images must be >= 1, got {batch_images}")
        if sdpa:
            use_sdpa(sam)
        self.sam, self.device, self.dtype = place_model(sam, device, dtype)
        if compile:
            compile_encoder(self.sam)
        self.origin = origin
        self.multimask = multimask
        self.min_region_area = min_region_area
        self.box_chunk = box_chunk
        self.batch_images = batch_images
        self.predictor = SamPredictor(self.sam)
        # id(image) -> (image, features (1, C, h, w), input size): embedded by `embed`, waiting
        # for that image's call; the image itself is held so its id cannot be reused meanwhile.
        self._embedded: dict[int, tuple[np.ndarray, torch.Tensor, tuple[int, int]]] = {}

    @property
    def uses_gpu(self) -> bool:
        return self.device.type == "cuda"

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> MaskOutput:
        """image (H, W, 3) uint8 RGB, boxes (N, 4) XYXY pixels -> N masks (H, W) and scores."""
        boxes, nothing = check_prompt(image, boxes)
        if nothing is not None:
            return nothing
        height, width = image.shape[:2]
        with inference(self.device, self.dtype):
            self._set_image(image)
            chunk = max(1, min(self.box_chunk, MAX_CHUNK_PIXELS // (height * width)))
            parts = [self._decode(boxes[i : i + chunk]) for i in range(0, len(boxes), chunk)]
        self.predictor.reset_image()
        masks = RleMasks(height, width, [m for p in parts for m in p[0]])
        pred_iou = np.concatenate([p[1] for p in parts]).astype(np.float32)
        stability = np.concatenate([p[2] for p in parts]).astype(np.float32)
        return MaskOutput(masks=masks, pred_iou=pred_iou, stability=stability)

    def embed(self, images: list[np.ndarray]) -> None:
        """Run the encoder on `images`, `batch_images` at a time, ahead of their calls (which
        must follow, in any order, before the next `embed`: it drops what is left).

        A batch whose encoder call fails leaves its images to their own calls, so a failure is
        reported for the image that causes it, never for the batch.
        """
        self._embedded.clear()
        ok = [im for im in images if im.ndim == 3 and im.shape[2] == 3 and im.dtype == np.uint8]
        for start in range(0, len(ok), self.batch_images):
            batch = ok[start : start + self.batch_images]
            try:
                with inference(self.device, self.dtype):
                    self._embed_batch(batch)
            except Exception as exc:  # retried image by image in __call__
                log.warning("batched SAM encoder failed on %d images, each is retried alone: %s",
                            len(batch), exc)

    def _embed_batch(self, images: list[np.ndarray]) -> None:
        """SamPredictor.set_image's steps for a batch: resize the long side, normalise and pad
        each image to img_size x img_size, one encoder pass over the stack."""
        pred = self.predictor
        inputs, sizes = [], []
        for image in images:
            resized = torch.as_tensor(pred.transform.apply_image(image), device=self.device)
            resized = resized.permute(2, 0, 1).contiguous()[None]
            sizes.append(tuple(resized.shape[-2:]))
            inputs.append(self.sam.preprocess(resized))
        features = self.sam.image_encoder(torch.cat(inputs))
        for i, image in enumerate(images):
            self._embedded[id(image)] = (image, features[i : i + 1], sizes[i])

    def _set_image(self, image: np.ndarray) -> None:
        """The predictor's state for `image`: its embedding from `embed` when there is one (the
        same steps as set_image, batched), else set_image."""
        cached = self._embedded.pop(id(image), None)
        if cached is None or cached[0] is not image:
            self.predictor.set_image(image, image_format="RGB")
            return
        pred = self.predictor
        pred.reset_image()
        pred.original_size, pred.input_size = image.shape[:2], cached[2]
        pred.features, pred.is_image_set = cached[1], True

    def _decode(self, boxes: np.ndarray) -> tuple[list[dict], np.ndarray, np.ndarray]:
        """Boxes (n, 4) of the current image -> n RLE masks (encoded per chunk), IoU (n,),
        stability (n,)."""
        sam, pred = self.sam, self.predictor
        boxes_t = torch.as_tensor(boxes, dtype=torch.float32, device=self.device)
        boxes_t = pred.transform.apply_boxes_torch(boxes_t, pred.original_size)
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes_t, masks=None)
        low_res, iou = sam.mask_decoder(
            image_embeddings=pred.features,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask,
        )
        best_iou, best_logits = pick_best(iou.float(), low_res.float())
        logits = sam.postprocess_masks(best_logits[:, None], pred.input_size, pred.original_size)
        logits = logits[:, 0].float()
        stability = stability_scores(logits, sam.mask_threshold)
        masks = logits > sam.mask_threshold
        encoded = encode_chunk(masks.cpu().numpy(), self.min_region_area)
        return encoded, best_iou.cpu().numpy(), stability.cpu().numpy()


def build_sam_masker(checkpoint: Path | None, variant: str, **kwargs) -> SamMasker:
    """Load and check the checkpoint, then wrap it; provenance is `sam:<variant>`."""
    return SamMasker(load_sam(checkpoint, variant), origin=f"sam:{variant}", **kwargs)
