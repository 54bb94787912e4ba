"""`vlm serve`: an OpenAI-compatible HTTP server for the trained model, and its web page.

    app.py        the routes: /v1/chat/completions (streamed or not), /v1/models, /health, / and /static
    scheduler.py  one worker thread that owns the model and decodes the requests that arrive together as one batch
    errors.py     OpenAI-style error bodies ({"error": {"message", "type", "param", "code"}}) and their handlers
    static/       the web page served at /
"""
