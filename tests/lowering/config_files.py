"""Made-up tuned config files (the schema of triton_config's), for the lookup tests."""

from __future__ import annotations

import json

SMALL = {"block_n": 32, "block_k": 64, "num_warps": 4, "num_stages": 3}


def write_config_file(tmp_path, gpu, capability, entries, bands=None, backward=None):
    path = tmp_path / (gpu.replace(" ", "_") + ".json")
    data = {"schema": 1, "gpu": gpu, "capability": capability, "entries": entries}
    extra = {name: v for name, v in (("bands", bands), ("backward", backward)) if v is not None}
    path.write_text(json.dumps({**data, **extra}))
    return path
