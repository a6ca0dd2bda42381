"""Speech synthesis: Piper voices, streamed sentence by sentence."""
