"""Serving: item embeddings exported to Parquet, an ANN index over them, replay evaluation of retrieval, and a
small HTTP service.

Data flow: ``<run_dir>/models/<model>/item_embeddings.npy`` + ``export/item_vocab`` --> ``serving.export``
(Parquet + HNSW index + recall figure) --> ``serving.replay`` (HR@K / NDCG@K over the test period, Li et al. 2011)
and ``serving.app`` (``/similar-items``).
"""
