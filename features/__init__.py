"""The contract between the pipelines, training and serving: where each table lives, its schema, the features
declared over it, the event format and the split protocol. Nothing here starts Spark, Kafka or Ray."""
