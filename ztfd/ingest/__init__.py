"""Ingest: Kafka messages to alert files and one store transaction per batch (the consumer role)."""
