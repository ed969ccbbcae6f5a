"""Studies that drive the detection pipeline (never the command line): the paper ablations and the
single-view method comparison."""
