"""A tiny, download-free demo task: one coloured shape per image, captions and Q/A about it.

* `shapes`: the deterministic procedural data set (`ShapesDataset`, `render`).
* `tokenizer`: a small word-level tokenizer with JanusFlow's special tokens (`build_tokenizer`).
* `evaluate`: a deterministic scorer for generated images and answers.
"""
