"""The load benchmark behind ``bench/run``: foldserve against its baselines, on loopback.

One concept a module, in the order a run uses them:

- ``cases``: what a request carries (model, samples, protocol), its body and the answer it must get
- ``servers``: the servers under test; ``process``, ``procfs``: start, readiness, CPU, RSS, stop
- ``checks``: golden inputs against golden outputs before every load run
- ``inprocess``: onnxruntime alone and the batcher's own cost, without HTTP
- ``wrk``: driving wrk with ``post.lua`` and parsing its summary into a ``Measurement``
- ``matrix``: each server alone, every case and concurrency; ``profile``: py-spy under load
- ``paired``: the decisive ratios, servers side by side measured in turn, server CPU per request
- ``rows64``: 64-row requests against their CPU bound (bare + 2 x the model + the JSON parse)
- ``client``: a closed-loop client with a deadline (goodput: wrk cannot see late answers)
- ``overload``: the best concurrency, then 4x and 16x it, per model
- ``hostile``, ``hostile_client``: one client sending ~60 MB bodies beside 8 ordinary ones
- ``real_store``, ``real_models``: MONAI ResNet-50 and UNet exported once (cached), then served
- ``parts``: each part after the matrix, within the budget
- ``targets``, ``targets_cost``, ``report``, ``report_cost``, ``summary``, ``plot``, ``machine``:
  PASS/FAIL, tables, the PNG, what ran where
- ``main``: the command line
"""
