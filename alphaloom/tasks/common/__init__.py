"""Cross-cutting building blocks every stage uses: the config model, content hashes, storage."""
