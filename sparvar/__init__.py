"""sparvar: fast VAR inference with SparVAR sparse attention."""
