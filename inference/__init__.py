"""Inference tools: embed images with a trained checkpoint, search a gallery, export to ONNX.

``inference.common.Embedder`` (embedding) and ``inference.search`` (gallery search) are the Python
API; ``create_embeddings.py``, ``get_similar.py`` and ``export_onnx.py`` are the command-line tools
built on them (see inference/README.md).
"""
