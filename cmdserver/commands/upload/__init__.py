"""upload."""
