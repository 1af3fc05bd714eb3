"""EagleVLM drafter, elastic visual compressor and the draft-sequence contract."""
