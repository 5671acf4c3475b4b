"""The model layer: plain PyTorch modules and their dataclass configs.

`config` (the dataclasses, validated at construction), `clip` (CLIP's vision and text towers), `siglip` (SigLIP's
image tower and its attention pooling), `pecore` (PE-Core's image tower, 2-D rotary embedding), `stan` (the STAN
branch, paper Sec. 3), `temporal` (the baselines: mean pooling and CLIP4Clip's seqTransf), `mug` (Mug-STAN's
alignment head), `video_clip` (`VideoCLIP`, the video model that joins them), `tokenizer` (CLIP's BPE), `text_tokenizers` (each model's own:
CLIP BPE, SentencePiece, tokenizer.json),
`heads` (recognition heads and class-name classifiers) and `pretrained` (the stanvid folder a model saves
itself as: `config.json` + `model.safetensors`; reading every format back is the checkpoints layer's job).

May import: the shared top modules and `stanvid.video` (the normalization constants of `video.transforms`).
"""
