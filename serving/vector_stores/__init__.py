"""OpenAI Vector Stores on Milvus: records, ingestion and search, run where the Milvus connection lives."""
