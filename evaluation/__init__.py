"""Serving trained models: one embedding path, zero-shot and retrieval evaluation, brand profiles and scores, search,
and the HTML reports. Depends on `training` (the model, tokenizer, checkpoints) and `pipeline`; never trains."""
