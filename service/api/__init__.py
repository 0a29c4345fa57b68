"""The HTTP API: thin routers, one per protocol, over the protocol-neutral services (service/services/).

    v1/       genserve's own REST API: models and health (models.py), densities, samples, anomaly scores and
              images (density.py), text generation and scoring (text.py); bodies in v1/schemas.py
    openai/   OpenAI's completions API (/v1/completions), bodies in openai/schemas.py
    v2/       the Open Inference Protocol (KServe v2, Triton): router.py, its tensors (tensors.py), schemas.py
    errors.py every domain error as its protocol's body and status; what each route declares in OpenAPI
    openapi.py the last touches to the generated OpenAPI schema

builder.py's `build_api` assembles them into the FastAPI app the Serve ingress (service/app.py) serves. This
file imports nothing, so that importing one of its modules (errors.py, from the middleware) loads no router.
"""
