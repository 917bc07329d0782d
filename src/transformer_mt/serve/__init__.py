"""tmt-serve: the HTTP API, its micro-batching and the web page."""
