"""attnhub's backends, one module each; `registry.yaml` says what each can run and points at its entry function.

Every entry has the signature `attention(q, k, v, rope, scale) -> o` with q: [B, H, N, D], k, v: [B, H, N_kv, D],
`rope` an `attnhub.CosSinTable` or None, and inputs already validated by `attnhub.api`.
"""
