"""Run from outside the source tree: the installed wheel imports every public module and trains."""

import importlib
import pkgutil
import subprocess
import sys

import torch

import mgll

assert "site-packages" in mgll.__file__, f"imported the source tree, not the wheel: {mgll.__file__}"
# The kernel modules need the [triton] extra, absent here on purpose; the backend's entry module
# must still import, and asking for the backend must name the extra.
modules = [m.name for m in pkgutil.walk_packages(mgll.__path__, "mgll.")]
for name in modules:
    if not name.startswith("mgll.backends._triton_"):
        importlib.import_module(name)
for name in mgll.__all__:
    getattr(mgll, name)
image = torch.randn(6, 8, requires_grad=True)
ids = torch.tensor([0, 0, 1, 1, 2, 2])
loss = mgll.MGLLLoss()(image, [torch.randn(6, 8), torch.randn(6, 8)], torch.tensor(10.0), labels=[ids, ids % 2])
loss.backward()
assert torch.isfinite(loss) and image.grad is not None
try:
    mgll.MGLLLoss(backend="triton")(image, [torch.randn(6, 8)], torch.tensor(10.0), labels=[ids])
except ImportError as error:
    assert "[triton] extra" in str(error), error
else:
    raise AssertionError("backend='triton' without triton installed did not raise ImportError")
# The demo ships in the wheel but needs the [demo] extra, absent here: one line naming it.
demo = subprocess.run([sys.executable, "-m", "mgll_demo", "--quick"], capture_output=True, text=True)
assert demo.returncode == 1 and "[demo] extra" in demo.stderr, (demo.returncode, demo.stderr)
assert len(demo.stderr.strip().splitlines()) == 1, demo.stderr
print(f"wheel OK: mgll {mgll.__version__}, torch {torch.__version__}, {len(modules)} modules, loss {loss.item():.4f}")
sys.exit(0)
