"""Data plumbing shared by the target recipe and drafter training: conversations -> token ids, shards -> batches."""
