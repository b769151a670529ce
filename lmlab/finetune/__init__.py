"""Fine-tuning: classification heads, instruction data with response-only loss, packing, and the recipe runner.

    heads.py     SequenceClassifier (last-token / [CLS] / mean pooling) with HF head names
    labeled.py   jsonl/csv labeled text        instruct.py  Alpaca / chat data, response spans
    packing.py   padded or packed batches      export.py    HF *ForSequenceClassification folders
    config.py    FinetuneConfig (YAML)         tasks.py     instruct / classify behind one interface
    runner.py    the training run (lmlab.train's optimizer, schedule, checkpoint)   command.py   `lmlab finetune`
    icl_eval.py  a classifier scored on an `lmlab icl` task's test items
"""
