"""kdcache: offline LLaVA-KD with a Zarr cache of teacher targets."""

__version__ = "0.1.0"
