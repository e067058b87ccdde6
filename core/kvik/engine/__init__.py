"""The engine: step loop, detokenization, outputs, memory planning."""
