"""Checkpoint files, below both ``hf`` and ``train``: `storage` (DCP files hashed as written, read
without running code), `record` (layout, manifest, record, verification, adapter extraction) and
`fingerprint` (the base's content identity that they all record)."""
