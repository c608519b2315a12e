"""Spark jobs (streaming ingest and batch features) and the data they start from. Each job is a module with a
``main()`` run as ``python -m pipelines.<job>`` or through ``spark-submit``; it writes the tables that
``features.tables`` describes."""
