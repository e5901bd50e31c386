"""Paged KV-cache inference: a page pool shared by requests and the prefix cache, length-following
decode attention, chunked prefill under a token budget and multi-step decode (PagedEngine)."""
