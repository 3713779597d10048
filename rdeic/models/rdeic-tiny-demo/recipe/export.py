"""Copy a trained model into the repository, stored in float16 to keep it a few MB.

    python rdeic/models/rdeic-tiny-demo/recipe/export.py out/demo-train/stage2/final rdeic/models/rdeic-tiny-demo
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from rdeic.weights import load_model, save_model  # noqa: E402


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    model, _ = load_model(source)
    model_id = save_model(model, target, storage_dtype=torch.float16)
    size = sum(p.stat().st_size for p in Path(target).glob("*.safetensors"))
    print(f"{target}: {model_id}, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
