"""In-context learning: classification tasks and their file layouts (tasks), prompts (prompt), which
demonstrations each item sees (selectors), how items are scored on the eval engine (scoring), how label
probabilities are calibrated (calibration), the grid of retrievers × shots × seeds (experiment), its curve
(plot) and `lmlab icl` (command). Retrievers live in lmlab.retrieval."""
