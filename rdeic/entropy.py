"""compressai's rANS coder and Gaussian conditional, without the cost of ``import compressai``.

``import compressai`` imports every subpackage it has, among them its point-cloud datasets and,
through them, torch_geometric: 2.5 s of start-up on this machine, for two modules the codec uses.
So, when nothing has imported compressai yet, its package is registered without running its
``__init__``: submodules import as usual, and the first other attribute anyone asks of the package
runs the real ``__init__`` then, so code that wants all of compressai still gets it.
"""

from __future__ import annotations

import importlib.util
import sys


def _register_lazily() -> None:
    if "compressai" in sys.modules:
        return
    spec = importlib.util.find_spec("compressai")
    package = importlib.util.module_from_spec(spec)

    def complete(name: str):
        # compressai's own defaults, which its entropy models ask the package for
        if name == "get_entropy_coder" and "_entropy_coder" not in vars(package):
            return lambda: "ans"
        del package.__getattr__  # before: the real __init__ asks the package for its submodules
        spec.loader.exec_module(package)  # the whole package, as `import compressai` gives it
        return getattr(package, name)

    package.__getattr__ = complete
    sys.modules["compressai"] = package


_register_lazily()

from compressai.ans import BufferedRansEncoder, RansDecoder  # noqa: E402

__all__ = ["BufferedRansEncoder", "GaussianConditional", "RansDecoder"]


def __getattr__(name: str):
    # imported on demand: it brings torch, which a coder process (rdeic.coders) does without
    if name == "GaussianConditional":
        from compressai.entropy_models import GaussianConditional

        return GaussianConditional
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
