"""Built-in datasets (import registers them): cqa, svamp, esnli, anli1 from the DSS release layout
under the data directory, and the embedded dataset `arith` (generated animal-class counting
problems; no external files)."""

from distill_sbs.tasks import anli, arith, cqa, esnli, svamp, world  # noqa: F401
