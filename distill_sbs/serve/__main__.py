r"""An OpenAI-compatible server over a trained student: `python -m distill_sbs.serve`.

    python -m distill_sbs.serve --checkpoint DIR --port 8000 [--host 127.0.0.1] [--api_key_env VAR]

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions
(max_tokens / max_completion_tokens, temperature, top_p, n, stop, seed, stream with
stream_options.include_usage, logprobs / top_logprobs, echo), GET /health, GET /metrics
(Prometheus text), and with --debug_endpoints GET /debug/state (counters only). Chat messages
become one input text: the text content of every message, in order, joined by a blank line; roles
are dropped, because a student is trained on plain inputs. See docs/serve.md.
"""

from distill_sbs.serve import cli

if __name__ == "__main__":
    cli.run()
