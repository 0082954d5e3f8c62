"""Model, mesh and training configs: one `ml_collections` file per job, each with `get_config()`.

Installed with the package (`pip install -e .`), so `from configs import tiny` works from any
directory; `dsv3-train --config=configs/tiny.py` and `ModelSpec.from_config("deepseek_v3_671b")`
load them by path or by name. Files that build on another config import it the same way
(`from configs import tiny`).
"""
