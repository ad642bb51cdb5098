"""The OpenAI-compatible HTTP server: `api_server.build_app`, request/response models
(`protocol`), OpenAI error bodies (`errors`) and Prometheus metrics (`metrics`).

Imports FastAPI; `serving` itself never imports this package (the GPU box may lack it).
"""
