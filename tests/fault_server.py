"""`python -m distill_sbs.serve` with fault injection, for end-to-end tests: run this file with
the serve flags; `POST /debug/faults {"plan": "500@2,..."}` sets the fault plan (see fakes.py)."""

import functools

from absl import app
from fakes import fault_handler  # this script's directory (tests/) is on sys.path

from distill_sbs import serve

if __name__ == "__main__":
    serve.define_flags()
    app.run(functools.partial(serve.main, handler_class=fault_handler()))
