"""Running a model: loading it fast, and the one decoding loop everything that generates goes through.

    load       RunConfig, add_run_args, prepare/load → Runner (dtype, quantization, threads, compile)
    runner     Runner: a model and its compiled step, held by the caller; prefill and step
    compile    the torch.compile'd decoding step
    quantize   int8 / int4 weight-only linears
    sampling   GenerationConfig; logits → processed logits → probabilities → token
    generate   the token loop (generate_tokens), plain or speculative
    drafting   Speculation (draft model / prompt lookup), the speculative step, per-row cache rollback
    speculative  verification, prompt lookup, adaptive k (DraftController), SpecStats
    text       streaming detokenizer, stop strings, generate / chat_turn
"""
