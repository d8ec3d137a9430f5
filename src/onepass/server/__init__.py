"""`onepass serve`: an OpenAI-compatible HTTP server over one LLM, with a live page.

protocol.py  request bodies (pydantic), response and error shapes
scheduler.py the thread that owns the model and serves queued jobs
sources.py   which text each token produced (the page's colours)
metrics.py   counters and their Prometheus text
app.py       the FastAPI app: routes, request checks, queueing
streams.py   a job's events as one JSON response or server-sent events
guards.py    API key, body size limit, errors as OpenAI bodies
cli.py       the `onepass serve` subcommand

Importing this package does not import FastAPI (the `server` extra): app.py does.
"""
