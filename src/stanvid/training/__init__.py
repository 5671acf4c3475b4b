"""The training layer: a paper recipe from YAML to a trained, evaluated model.

`recipe` (the validated YAML recipe), `loop` (`fit`: AMP, DDP, accumulation, evaluation during training),
`data_order` (the resumable, rank-sharded order of training samples), `state` (RNG state and run log),
`checkpoint` (training checkpoints: write atomically, resume exactly), `losses` (the contrastive and
recognition losses and their distributed gather), `evaluate` (retrieval and recognition evaluation),
`metrics` (R@K, MdR, MnR, top-k, tie rules), `runs` (a recipe's run end to end: data, model, fit, eval) and
`publish` (a trained model and its evaluation to the Hugging Face hub).

May import: the shared top modules, `stanvid.video`, `stanvid.models`, `stanvid.checkpoints` and
`stanvid.data`. Never `stanvid.search`, the demo or the CLI.
"""
