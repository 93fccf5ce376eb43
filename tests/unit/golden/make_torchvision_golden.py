"""Regenerate torchvision_state_dicts.json from a real torchvision (not needed to run the tests).

    pip install --no-deps --target /tmp/tv "torchvision==0.28.*"
    PYTHONPATH=/tmp/tv python tests/unit/golden/make_torchvision_golden.py

Records, for every torchvision model seerlike builds under the same name, the number of
state-dict entries and a SHA-256 of its ordered ``name:shape`` lines, so the unit tests can
check names, shapes and order against torchvision without importing it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

# torchvision's compiled ops may not match this torch build; its models don't need them.
torch.library.register_fake = lambda *a, **k: (lambda f: f)
import torchvision  # noqa: E402
from torchvision import models as tvm  # noqa: E402

from seerlike import models  # noqa: E402


def signature(state_dict: dict) -> dict:
    lines = [f"{k}:{tuple(v.shape)}" for k, v in state_dict.items()]
    return {"entries": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def main() -> None:
    out = {"torchvision": torchvision.__version__, "models": {}}
    for name in models.names():
        if not hasattr(tvm, name):
            continue
        if name.startswith("regnet"):
            model = getattr(tvm, name)()  # BlockParams computes on real tensors: no meta device
        else:
            with torch.device("meta"):
                model = getattr(tvm, name)()
        out["models"][name] = signature(model.state_dict())
        print(name, out["models"][name])
    path = Path(__file__).with_name("torchvision_state_dicts.json")
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
