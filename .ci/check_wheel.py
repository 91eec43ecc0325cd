"""Run from outside the source tree: the installed wheel imports every public module and trains."""

import importlib
import pkgutil
import sys

import torch

import mgll

assert "site-packages" in mgll.__file__, f"imported the source tree, not the wheel: {mgll.__file__}"
optional = {"mgll.backends.triton_kernels"}  # needs the [triton] extra, absent here on purpose
modules = [m.name for m in pkgutil.walk_packages(mgll.__path__, "mgll.")]
for name in modules:
    if name in optional:
        continue
    importlib.import_module(name)
for name in mgll.__all__:
    getattr(mgll, name)
image = torch.randn(6, 8, requires_grad=True)
ids = torch.tensor([0, 0, 1, 1, 2, 2])
loss = mgll.MGLLLoss()(image, [torch.randn(6, 8), torch.randn(6, 8)], torch.tensor(10.0), labels=[ids, ids % 2])
loss.backward()
assert torch.isfinite(loss) and image.grad is not None
print(f"wheel OK: mgll {mgll.__version__}, torch {torch.__version__}, {len(modules)} modules, loss {loss.item():.4f}")
sys.exit(0)
