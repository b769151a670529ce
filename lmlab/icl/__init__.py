"""In-context learning: which demonstrations each item sees (selectors) and how label probabilities are
calibrated (calibration). Retrievers live in lmlab.retrieval; scoring goes through lmlab.eval's engine."""
