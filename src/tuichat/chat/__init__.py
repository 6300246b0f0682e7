"""Talking to a server: the HTTP client, sampling, the conversation engine, the store and what they clean and attach."""
