#!/bin/sh
# BoolQ with retrieval: the commands behind docs/retrieval.md (run from the repository root).
# N questions (the first N of val.jsonl) for accuracy; recall uses all 3,270.
set -e
N=${N:-100}
B=../shared/data/eval/superglue/BoolQ
OUT=${OUT:-runs}
mkdir -p $OUT
t() { s=$(date +%s); "$@"; echo "[$(($(date +%s) - s)) s] $*" >> $OUT/times.log; }
[ -f $OUT/boolq-bm25/retriever.json ] || t lmlab index $B/val.jsonl $B/train.jsonl --text-field passage -o $OUT/boolq-bm25
[ -f $OUT/boolq-dense/retriever.json ] || t lmlab index $B/val.jsonl $B/train.jsonl --text-field passage --dense -o $OUT/boolq-dense
for kind in bm25 dense; do
  t python -m lmlab.retrieval.recall $OUT/boolq-$kind $B/val.jsonl --k 1,5 --output $OUT/recall-$kind.json
done
E="lmlab eval -m smollm2-135m --data-dir ../shared/data/eval --limit $N --threads 2"
t $E --tasks boolq_closed --output $OUT/boolq-none.json
t $E --tasks boolq_closed --retrieve $OUT/boolq-bm25 --output $OUT/boolq-bm25.json --log-samples
t $E --tasks boolq_closed --retrieve $OUT/boolq-dense --output $OUT/boolq-dense.json --log-samples
t $E --tasks boolq --output $OUT/boolq-gold.json
