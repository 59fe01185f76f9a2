"""Independent oracles: the document's numpy program (numpy_seed: shares no code with manual/ or
the twin) and central finite differences in float64 (fd: the analytic gradients of manual/ against
differences of a float64 forward written in plain torch ops)."""
