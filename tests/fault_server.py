"""`python -m distill_sbs.serve` with fault injection, for end-to-end tests: run this file with
the serve flags; `POST /debug/faults {"plan": "500@2,..."}` sets the fault plan (see fakes.py)."""

from fakes import fault_handler  # this script's directory (tests/) is on sys.path

from distill_sbs.serve import cli

if __name__ == "__main__":
    cli.run(fault_handler())
