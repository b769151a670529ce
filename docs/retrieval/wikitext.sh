#!/bin/sh
# In-Context RALM perplexity on WikiText-2 test (the first L articles), retrieving from the BoolQ
# passage indexes that docs/retrieval/boolq.sh builds (Wikipedia paragraphs disjoint from WikiText-2).
set -e
L=${L:-1}; W=${W:-512}; S=${S:-64}
OUT=${OUT:-runs}
t() { s=$(date +%s); "$@"; echo "[$(($(date +%s) - s)) s] $*" >> $OUT/times.log; }
E="lmlab eval -m smollm2-135m --tasks wikitext --data-dir ../shared/data/corpora --limit $L --max-length $W --rolling-stride $S --threads 2"
t $E --output $OUT/wikitext-none-L$L-W$W-S$S.json
t $E --retrieve $OUT/boolq-bm25 --retrieve-query-tokens 32 --output $OUT/wikitext-bm25-L$L-W$W-S$S.json
t $E --retrieve $OUT/boolq-dense --retrieve-query-tokens 32 --output $OUT/wikitext-dense-L$L-W$W-S$S.json
