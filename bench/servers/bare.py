"""The web-stack limit: FastAPI on uvicorn that reads the body and returns a constant.

No parsing, no model. The constant is foldserve's answer for digits-mlp's first golden sample,
so a response check on the client costs the same as against foldserve (one-sample requests).
The V2 infer path reads its body and answers the same constant: what receiving a binary tensor
request costs the web stack, the base of issue 17's bound for 64-row V2 requests.
"""

from __future__ import annotations

import argparse

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

from servers.common import manifest, uvicorn_options


def constant_answer() -> bytes:
    m = manifest("digits-mlp")
    outputs = m["golden"]["outputs"][0]
    label = m["labels"][max(range(len(outputs)), key=outputs.__getitem__)]
    body = {"model": "digits-mlp", "version": 1, "outputs": [outputs], "predictions": [label]}
    return orjson.dumps(body)


def create_app() -> FastAPI:
    app = FastAPI(docs_url=None, openapi_url=None)
    answer = constant_answer()

    @app.post("/predict")
    @app.post("/models/{name}/predict")
    @app.post("/v2/models/{name}/infer")
    async def predict(request: Request) -> Response:
        await request.body()
        return Response(answer, media_type="application/json")

    @app.get("/readyz")
    async def ready() -> Response:
        return Response(b"{}", media_type="application/json")

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    uvicorn.run(create_app(), **uvicorn_options(parser.parse_args().port))
