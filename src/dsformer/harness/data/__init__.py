"""Task data that ships with dsformer by reference (downloaded and converted at set-up, never committed)."""
