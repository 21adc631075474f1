"""The OpenAI-compatible server (`infercept serve`): `OpenAIServer(AsyncLLM(...), name).app` is its ASGI app."""
