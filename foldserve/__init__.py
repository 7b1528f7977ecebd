"""foldserve's offline side (torch only): freeze BatchNorm statistics, fold every BN away, export,
verify and store. Three entry points share one path: ``foldserve train`` (the demos),
``foldserve export`` (your ``nn.Module``) and ``foldserve import`` (an ONNX file).

The server (``service``) never imports this package.
"""
