"""The ML steps of textcls as plain typed functions.

Paths and parameters in, artifacts and metrics out. Nothing in this package
knows about Celery, HTTP or the database.

Every model artifact is a folder holding ``config.json`` (with ``id2label``),
the tokenizer files, the weights (``model.safetensors`` or ``model.onnx``) and
``textcls.json`` (see :mod:`pipeline.contract`), so any format can be served
with exactly the preprocessing it was trained with.
"""
