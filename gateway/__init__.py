"""The gateway: the public TalkerService that chains ASR, Chat, Synthesize and Animate."""
