"""What a run returns and writes: the result, saved runs, the residuals file, the verdict, plausibility checks."""
