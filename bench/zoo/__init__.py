"""The model zoo report: every BatchNorm network of monai.networks.nets and efficientnet-pytorch,
randomly initialized with non-trivial statistics, put through ``foldserve.export`` and measured.

Not part of the test suite: ``bench/model-zoo`` runs it (20-30+ minutes on two cores) and writes
docs/model-zoo.md and a JSON of the raw figures. ``catalogue`` says what is built and at which
size, ``coverage`` what monai exports and why the rest is skipped, ``measure`` what one network
costs and proves, ``latency`` how onnxruntime is timed, ``report`` how the figures are written.
"""
