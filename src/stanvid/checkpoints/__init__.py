"""The checkpoint layer: every checkpoint format in, one model out, and models out to the hub.

`load` (`load_model`, `create_model`, `detect_format`, `convert_checkpoint`: format detection by content),
`convert` (the literal key maps and config readers of OpenAI, Hugging Face, open_clip, official STAN and
CLIP4Clip checkpoints), `siglip` (Hugging Face SigLIP folders), `timm_towers` (open_clip folders with a SigLIP
or PE-Core timm tower), `families` (what those two share: the `FamilyCheckpoint` they return), `download`
(OpenAI's files and Hugging Face hub repositories into a cache), `zoo` (open_clip's pretrained names), `upload`
(a saved folder and its model card to a hub repository), `fingerprint` (a model's identity, recorded by indexes
and exports), `export_onnx` (a model as ONNX graphs and a manifest) and `onnx_runtime` (an export folder as an
encoder run by onnxruntime, which `load_model` returns).

May import: the shared top modules, `stanvid.video` and `stanvid.models`.
"""
