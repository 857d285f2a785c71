"""`mochi serve`: a web UI and an HTTP API on one server (FastAPI on uvicorn; install the `serve` extra).

``jobs`` holds the queue and the worker that runs the pipeline, ``api`` the routes and the page they serve,
``server`` the binding rule and uvicorn. Nothing here is imported by ``import mochi``.
"""
