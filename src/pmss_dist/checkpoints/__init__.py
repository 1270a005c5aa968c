"""Checkpoint files, below both ``hf`` and ``train``: `storage` (DCP files hashed as written, read
without running code) and `record` (layout, manifest, record, verification, adapter extraction)."""
