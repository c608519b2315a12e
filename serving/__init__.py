"""Serving: item embeddings exported to Parquet, an ANN index over them, the versioned registry of those
embeddings, the publish pointer, and a small HTTP service.

Data flow: ``<run_dir>/models/<model>/item_embeddings.npy`` + ``export/item_vocab`` --> ``serving.export``
(Parquet + HNSW index + recall figure, ``serving.index_files``; each version also to ``gold.item_embeddings``,
``serving.registry``) --> ``serving.app`` (``/similar-items``, ``/recommend``; the bundle it answers from,
``serving.bundle``, loads the export, a registry version, or the version ``serving.publish``'s pointer names).

Offline evaluation is the ``evaluation`` package beside this one: it reads serving's exported index and writes the
publish pointer through ``serving.publish``; serving never imports evaluation.
"""
