"""`sd-run serve`: an HTTP server speaking the A1111 and OpenAI image APIs (extra `[serve]`).

Only this subpackage imports FastAPI, uvicorn and prometheus_client; the runtime core stays free of them.
"""
